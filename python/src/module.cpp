// uaa._uaa — the C++ side of the Python package `uaa` (pybind11).
//
// Thin: the Python package (python/uaa/) holds the friendly API; this module binds the C++ one and
// does what must be fast or exact here:
//  - views of NumPy arrays (buffer protocol) and PyTorch CPU tensors (data_ptr/stride/dtype) as
//    uaa::ConstTensor / uaa::Tensor, with no copy: [S, H, D] and [B, S, H, D], strides in elements;
//  - forward() and backward() with the GIL released;
//  - a problem found while viewing an argument (another element type, a non-contiguous head_dim, an
//    object that is no array) is handed to the C++ call as its `caller_problem`, so that it becomes
//    the same uaa::Error on every rank (as any bad argument of the C++ API does) instead of a Python
//    exception on this rank alone while its peers wait in the call;
//  - uaa::Error → the uaa.Error subclass of its code (python/uaa/errors.py), with the C++ message.
#include <mpi.h>
// mpi4py's C API: PyMPIComm_Get (the MPI_Comm of an mpi4py communicator).
#include <mpi4py/mpi4py.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace py = pybind11;

namespace {

// Python objects this module keeps for the life of the process. Never destroyed: a static
// py::object would be released after the interpreter is gone.
struct Globals {
  py::object errors_module;  // uaa.errors (imported on the first error)
  py::object torch_tensor;   // torch.Tensor, once torch is imported by someone
  py::object torch_float32, torch_bfloat16, torch_strided;
};
Globals& globals() {
  static Globals* g = new Globals();
  return *g;
}

// --- errors ---------------------------------------------------------------------------------

const char* error_class_name(uaa::ErrorCode code) {
  switch (code) {
    case uaa::ErrorCode::invalid_argument: return "InvalidArgumentError";
    case uaa::ErrorCode::mismatch: return "MismatchError";
    case uaa::ErrorCode::unsupported: return "UnsupportedError";
    case uaa::ErrorCode::comm_failure: return "CommFailureError";
    case uaa::ErrorCode::timeout: return "TimeoutError";
    case uaa::ErrorCode::internal: return "InternalError";
    case uaa::ErrorCode::out_of_memory: return "OutOfMemoryError";
  }
  return "Error";
}

void set_python_error(uaa::ErrorCode code, const char* message) {
  try {
    Globals& g = globals();
    if (!g.errors_module) g.errors_module = py::module_::import("uaa.errors");
    py::object cls = g.errors_module.attr(error_class_name(code));
    py::object instance = cls(py::str(message));
    PyErr_SetObject(cls.ptr(), instance.ptr());
  } catch (py::error_already_set& e) {
    // uaa.errors itself failed to import: still no crash, a RuntimeError with the message.
    PyErr_SetString(PyExc_RuntimeError,
                    (std::string(message) + " (and uaa.errors: " + e.what() + ")").c_str());
  }
}

uaa::ErrorCode parse_error_code(const std::string& name) {
  static const std::pair<const char*, uaa::ErrorCode> codes[] = {
      {"invalid_argument", uaa::ErrorCode::invalid_argument},
      {"mismatch", uaa::ErrorCode::mismatch},
      {"unsupported", uaa::ErrorCode::unsupported},
      {"comm_failure", uaa::ErrorCode::comm_failure},
      {"timeout", uaa::ErrorCode::timeout},
      {"internal", uaa::ErrorCode::internal},
      {"out_of_memory", uaa::ErrorCode::out_of_memory},
  };
  for (const auto& [n, c] : codes)
    if (name == n) return c;
  throw uaa::Error(uaa::ErrorCode::invalid_argument, "unknown error code '" + name + "'");
}

// --- array views ----------------------------------------------------------------------------

// What this module learned about one array argument. `problem` is "" when it is usable.
struct ArrayInfo {
  void* data = nullptr;
  int ndim = 0;
  std::int64_t shape[4] = {0, 0, 0, 0};
  std::int64_t stride[4] = {0, 0, 0, 0};  // in elements
  uaa::DType dtype = uaa::DType::f32;
  std::string problem;
};

std::string type_name(py::handle obj) {
  return py::str(py::type::handle_of(obj).attr("__qualname__")).cast<std::string>();
}

bool is_torch_tensor(py::handle obj) {
  Globals& g = globals();
  if (!g.torch_tensor) {
    // torch is never imported here: an object can only be a tensor once someone imported torch.
    py::dict modules = py::module_::import("sys").attr("modules");
    if (!modules.contains("torch")) return false;
    py::object torch = modules["torch"];
    if (!py::hasattr(torch, "Tensor")) return false;  // torch is still importing
    g.torch_tensor = torch.attr("Tensor");
    g.torch_float32 = torch.attr("float32");
    g.torch_bfloat16 = torch.attr("bfloat16");
    g.torch_strided = torch.attr("strided");
  }
  return py::isinstance(obj, g.torch_tensor);
}

// Reads an array argument (NumPy array or PyTorch CPU tensor) without copying it.
ArrayInfo inspect(const char* name, py::handle obj, bool writable) {
  ArrayInfo a;
  auto fail = [&](const std::string& what) {
    a.problem = std::string(name) + " " + what;
    return a;
  };
  if (obj.is_none()) return fail("is None");
  if (py::isinstance<py::array>(obj)) {
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!arr.dtype().equal(py::dtype::of<float>()))
      return fail("has NumPy dtype " + py::str(arr.dtype()).cast<std::string>() +
                  "; uaa takes float32 (NumPy has no bfloat16: pass torch.bfloat16 tensors for bf16)");
    if (writable && !arr.writeable()) return fail("is a read-only NumPy array");
    a.ndim = static_cast<int>(arr.ndim());
    if (a.ndim < 1 || a.ndim > 4)
      return fail("has " + std::to_string(a.ndim) + " dimensions");
    for (int i = 0; i < a.ndim; ++i) {
      a.shape[i] = static_cast<std::int64_t>(arr.shape(i));
      const auto bytes = static_cast<std::int64_t>(arr.strides(i));
      if (bytes % static_cast<std::int64_t>(sizeof(float)) != 0)
        return fail("has a stride of " + std::to_string(bytes) +
                    " bytes, not a whole number of float32 elements");
      a.stride[i] = bytes / static_cast<std::int64_t>(sizeof(float));
    }
    a.data = const_cast<void*>(arr.data());
    if (reinterpret_cast<std::uintptr_t>(a.data) % alignof(float) != 0)
      return fail("is not aligned to its element size");
    a.dtype = uaa::DType::f32;
    return a;
  }
  if (is_torch_tensor(obj)) {
    Globals& g = globals();
    if (!obj.attr("is_cpu").cast<bool>())
      return fail("is a tensor on device " + py::str(obj.attr("device")).cast<std::string>() +
                  "; uaa takes CPU tensors");
    if (!py::object(obj.attr("layout")).is(g.torch_strided))
      return fail("is a tensor of layout " + py::str(obj.attr("layout")).cast<std::string>() +
                  "; uaa takes strided (dense) tensors");
    py::object dtype = obj.attr("dtype");
    if (dtype.is(g.torch_float32)) {
      a.dtype = uaa::DType::f32;
    } else if (dtype.is(g.torch_bfloat16)) {
      a.dtype = uaa::DType::bf16;
    } else {
      return fail("has dtype " + py::str(dtype).cast<std::string>() +
                  "; uaa takes torch.float32 and torch.bfloat16");
    }
    if (writable && obj.attr("requires_grad").cast<bool>())
      return fail("requires grad; uaa writes into it (use uaa.torch.attention for autograd)");
    py::tuple shape = obj.attr("shape");
    py::tuple stride = obj.attr("stride")();
    a.ndim = static_cast<int>(shape.size());
    if (a.ndim < 1 || a.ndim > 4)
      return fail("has " + std::to_string(a.ndim) + " dimensions");
    for (int i = 0; i < a.ndim; ++i) {
      a.shape[i] = shape[static_cast<std::size_t>(i)].cast<std::int64_t>();
      a.stride[i] = stride[static_cast<std::size_t>(i)].cast<std::int64_t>();
    }
    a.data = reinterpret_cast<void*>(obj.attr("data_ptr")().cast<std::uintptr_t>());
    return a;
  }
  return fail("is a " + type_name(obj) + "; uaa takes NumPy arrays and PyTorch CPU tensors");
}

std::string dims(const ArrayInfo& a) {
  std::string s = "[";
  for (int i = 0; i < a.ndim; ++i) s += (i ? ", " : "") + std::to_string(a.shape[i]);
  return s + "]";
}

// A [S, H, D] or [B, S, H, D] argument as a uaa tensor view for `plan`. Token count, heads,
// head_dim and dtype are left to the C++ checks (their messages name the plan's values).
std::string to_view(const char* name, const ArrayInfo& a, const uaa::Plan& plan, uaa::Tensor* t) {
  if (!a.problem.empty()) return a.problem;
  const std::int64_t batch = plan.batch();
  int o = 0;  // offset of the token axis
  if (a.ndim == 3) {
    if (batch > 1)
      return std::string(name) + " has shape " + dims(a) + " but the plan has batch " +
             std::to_string(batch) + ": pass [B, S, H, D]";
  } else if (a.ndim == 4) {
    if (a.shape[0] != batch)
      return std::string(name) + " has shape " + dims(a) + ": batch " + std::to_string(a.shape[0]) +
             " but the plan has batch " + std::to_string(batch);
    o = 1;
  } else {
    return std::string(name) + " has shape " + dims(a) + "; uaa takes [S, H, D] or [B, S, H, D]";
  }
  t->data = a.data;
  t->tokens = a.shape[o];
  t->heads = a.shape[o + 1];
  t->head_dim = a.shape[o + 2];
  t->token_stride = a.stride[o];
  t->head_stride = a.stride[o + 1];
  t->dtype = a.dtype;
  t->batch_stride = 0;
  const bool empty = t->tokens == 0 || t->heads == 0 || t->head_dim == 0;
  if (t->head_dim > 1 && a.stride[o + 2] != 1 && !empty)
    return std::string(name) + " has a head_dim stride of " + std::to_string(a.stride[o + 2]) +
           " elements; uaa needs the last axis contiguous (stride 1): pass a contiguous copy";
  if (o == 1 && batch > 1 && !empty) {
    if (a.stride[0] == 0)
      return std::string(name) + " has a batch stride of 0 (a broadcast view); uaa needs each "
             "sequence in its own memory: pass a contiguous copy";
    t->batch_stride = a.stride[0];
  }
  return {};
}

// An lse argument: [S, H] or [B, S, H] float32, heads contiguous.
std::string to_lse(const ArrayInfo& a, const uaa::Plan& plan, float** lse, std::int64_t* ts,
                   std::int64_t* bs) {
  if (!a.problem.empty()) return a.problem;
  if (a.dtype != uaa::DType::f32) return "lse must be float32";
  const std::int64_t batch = plan.batch();
  const std::int64_t tokens = plan.q_tokens(), heads = plan.shape().q_heads;
  int o = 0;
  if (a.ndim == 3 && a.shape[0] == batch) {
    o = 1;
  } else if (a.ndim != 2 || batch > 1) {
    return "lse has shape " + dims(a) + "; the plan needs " +
           (batch > 1 ? "[" + std::to_string(batch) + ", " : std::string("[")) +
           std::to_string(tokens) + ", " + std::to_string(heads) + "]";
  }
  if (a.shape[o] != tokens || a.shape[o + 1] != heads)
    return "lse has shape " + dims(a) + " but the plan gives this rank " + std::to_string(tokens) +
           " tokens of " + std::to_string(heads) + " heads";
  *lse = static_cast<float*>(a.data);
  *ts = 0;
  *bs = 0;
  if (tokens == 0 || heads == 0) return {};
  if (heads > 1 && a.stride[o + 1] != 1)
    return "lse has a head stride of " + std::to_string(a.stride[o + 1]) +
           " elements; uaa needs the heads contiguous";
  if (a.stride[o] < 0) return "lse has a negative token stride";
  // 0 means "heads" to uaa: a real 0 only fits a single token.
  *ts = a.stride[o] == 0 ? (tokens == 1 ? heads : -1) : a.stride[o];
  if (*ts < 0) return "lse has a token stride of 0 (a broadcast view)";
  if (o == 1 && batch > 1) {
    if (a.stride[0] <= 0) return "lse has a batch stride of " + std::to_string(a.stride[0]);
    *bs = a.stride[0];
  }
  return {};
}

// --- calls ----------------------------------------------------------------------------------

py::dict forward_times(const uaa::PhaseTimes& t) {
  py::dict d;
  d["handshake"] = t.handshake;
  d["pack"] = t.pack;
  d["exchange_qkv"] = t.exchange_qkv;
  d["attention"] = t.attention;
  d["exchange_out"] = t.exchange_out;
  d["unpack"] = t.unpack;
  d["total"] = t.total;
  d["wait"] = t.wait;
  return d;
}

py::dict backward_times(const uaa::BackwardTimes& t) {
  py::dict d;
  d["handshake"] = t.handshake;
  d["prepare"] = t.prepare;
  d["exchange_in"] = t.exchange_in;
  d["kernel"] = t.kernel;
  d["carry"] = t.carry;
  d["exchange_out"] = t.exchange_out;
  d["reduce"] = t.reduce;
  d["total"] = t.total;
  return d;
}

// The workspace of the calling thread, for calls that pass none (a workspace serves one call at
// a time; one per thread is what the C++ API asks for).
uaa::Workspace& thread_workspace() {
  thread_local uaa::Workspace ws;
  return ws;
}

// Wall time of the last uaa::forward/backward call this thread made through this module, measured
// around the C++ call alone (views made, GIL released): the benchmark of the Python call overhead
// subtracts it from the Python call's own wall time.
thread_local double g_last_call_seconds = 0;
thread_local double g_call_seconds_total = 0;  // the sum over all of this thread's calls

struct CallTimer {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~CallTimer() {
    g_last_call_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    g_call_seconds_total += g_last_call_seconds;
  }
};

// A read-only argument as a ConstTensor view.
std::string to_const_view(const char* name, py::handle obj, const uaa::Plan& plan,
                          uaa::ConstTensor* t) {
  uaa::Tensor view;
  std::string problem = to_view(name, inspect(name, obj, false), plan, &view);
  *t = view;
  return problem;
}

// The views of one forward call's arguments. Each argument is inspected in order; the first
// problem found becomes args.caller_problem (so the call fails on every rank with it). Not
// copyable: caller_problem points into `problem`.
struct ForwardViews {
  std::string problem;
  uaa::AttentionArgs args;

  ForwardViews(const uaa::Plan& plan, py::handle q, py::handle k, py::handle v, py::handle out,
               py::handle lse) {
    note(to_const_view("q", q, plan, &args.q));
    note(to_const_view("k", k, plan, &args.k));
    note(to_const_view("v", v, plan, &args.v));
    note(to_view("out", inspect("out", out, true), plan, &args.out));
    if (!lse.is_none())
      note(to_lse(inspect("lse", lse, true), plan, &args.lse, &args.lse_token_stride,
                  &args.lse_batch_stride));
    args.caller_problem = problem.empty() ? nullptr : problem.c_str();
  }
  ForwardViews(const ForwardViews&) = delete;
  ForwardViews& operator=(const ForwardViews&) = delete;

 private:
  void note(std::string p) {
    if (problem.empty() && !p.empty()) problem = std::move(p);
  }
};

// The same for a backward call (out and lse are read, dq, dk, dv written).
struct BackwardViews {
  std::string problem;
  uaa::BackwardArgs args;

  BackwardViews(const uaa::Plan& plan, py::handle q, py::handle k, py::handle v, py::handle out,
                py::handle lse, py::handle dout, py::handle dq, py::handle dk, py::handle dv) {
    note(to_const_view("q", q, plan, &args.q));
    note(to_const_view("k", k, plan, &args.k));
    note(to_const_view("v", v, plan, &args.v));
    note(to_const_view("out", out, plan, &args.out));
    float* lse_ptr = nullptr;
    if (!lse.is_none())
      note(to_lse(inspect("lse", lse, false), plan, &lse_ptr, &args.lse_token_stride,
                  &args.lse_batch_stride));
    args.lse = lse_ptr;
    note(to_const_view("dout", dout, plan, &args.dout));
    note(to_view("dq", inspect("dq", dq, true), plan, &args.dq));
    note(to_view("dk", inspect("dk", dk, true), plan, &args.dk));
    note(to_view("dv", inspect("dv", dv, true), plan, &args.dv));
    args.caller_problem = problem.empty() ? nullptr : problem.c_str();
  }
  BackwardViews(const BackwardViews&) = delete;
  BackwardViews& operator=(const BackwardViews&) = delete;

 private:
  void note(std::string p) {
    if (problem.empty() && !p.empty()) problem = std::move(p);
  }
};

py::object forward(const uaa::Plan& plan, py::handle q, py::handle k, py::handle v, py::handle out,
                   py::handle lse, uaa::SavedForward* saved, uaa::Workspace* ws, bool times) {
  const ForwardViews views(plan, q, k, v, out, lse);
  uaa::Workspace& w = ws ? *ws : thread_workspace();
  uaa::PhaseTimes t;
  {
    py::gil_scoped_release nogil;
    CallTimer timer;
    if (saved)
      uaa::forward(plan, views.args, w, *saved, times ? &t : nullptr);
    else
      uaa::forward(plan, views.args, w, times ? &t : nullptr);
  }
  if (!times) return py::none();
  return forward_times(t);
}

py::object backward(const uaa::Plan& plan, py::handle q, py::handle k, py::handle v, py::handle out,
                    py::handle lse, py::handle dout, py::handle dq, py::handle dk, py::handle dv,
                    const uaa::SavedForward* saved, uaa::Workspace* ws, bool times) {
  const BackwardViews views(plan, q, k, v, out, lse, dout, dq, dk, dv);
  uaa::Workspace& w = ws ? *ws : thread_workspace();
  uaa::BackwardTimes t;
  {
    py::gil_scoped_release nogil;
    CallTimer timer;
    if (saved)
      uaa::backward(plan, views.args, w, *saved, times ? &t : nullptr);
    else
      uaa::backward(plan, views.args, w, times ? &t : nullptr);
  }
  if (!times) return py::none();
  return backward_times(t);
}

// forward(saved) + backward(saved) `iters` times from C++: the reference of the autograd
// benchmark. Returns each pair's wall time in seconds.
std::vector<double> time_forward_backward_cpp(const uaa::Plan& plan, py::handle q, py::handle k,
                                              py::handle v, py::handle out, py::handle lse,
                                              py::handle dout, py::handle dq, py::handle dk,
                                              py::handle dv, int iters) {
  const ForwardViews f(plan, q, k, v, out, lse);
  const BackwardViews b(plan, q, k, v, out, lse, dout, dq, dk, dv);
  std::vector<double> seconds;
  uaa::Workspace& w = thread_workspace();
  uaa::SavedForward saved;
  py::gil_scoped_release nogil;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    uaa::forward(plan, f.args, w, saved);
    uaa::backward(plan, b.args, w, saved);
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return seconds;
}

// Takes part in a forward() call of `plan` that fails on every rank with `message` (a problem the
// Python side found before it could make the call's views), so no rank is left waiting.
void fail_forward(const uaa::Plan& plan, const std::string& message) {
  uaa::AttentionArgs args;
  args.caller_problem = message.c_str();
  py::gil_scoped_release nogil;
  uaa::forward(plan, args, thread_workspace());
}

// Runs the same forward() `iters` times from C++ (no Python in the loop) and returns each call's
// wall time in seconds: the reference of the call-overhead benchmark.
std::vector<double> time_forward_cpp(const uaa::Plan& plan, py::handle q, py::handle k,
                                     py::handle v, py::handle out, py::handle lse, int iters) {
  const ForwardViews f(plan, q, k, v, out, lse);
  std::vector<double> seconds;
  seconds.reserve(static_cast<std::size_t>(std::max(iters, 0)));
  uaa::Workspace& w = thread_workspace();
  py::gil_scoped_release nogil;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    uaa::forward(plan, f.args, w);
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return seconds;
}

// --- communicators and plans --------------------------------------------------------------------

std::string mpi_library_version() {
  char buf[MPI_MAX_LIBRARY_VERSION_STRING + 1] = {0};
  int len = 0;
  MPI_Get_library_version(buf, &len);
  return std::string(buf, static_cast<std::size_t>(std::max(len, 0)));
}

// The MPI this module was compiled against (its mpi.h), as mpi4py.MPI.get_vendor() says it:
// ("Open MPI", (4, 1, 4)), ("MPICH", (4, 0, 2)). Compile-time, so it cannot be fooled by the
// dynamic linker resolving this module's MPI symbols to another loaded MPI library.
py::tuple mpi_compiled_vendor() {
#if defined(OPEN_MPI)
  return py::make_tuple("Open MPI",
                        py::make_tuple(OMPI_MAJOR_VERSION, OMPI_MINOR_VERSION, OMPI_RELEASE_VERSION));
#elif defined(MPICH_NUMVERSION)
  return py::make_tuple("MPICH", py::make_tuple(MPICH_NUMVERSION / 10000000,
                                                MPICH_NUMVERSION / 100000 % 100,
                                                MPICH_NUMVERSION / 1000 % 100));
#else
  return py::make_tuple("unknown", py::make_tuple(0, 0, 0));
#endif
}

std::shared_ptr<uaa::Communicator> communicator_from_mpi4py(py::handle comm,
                                                            std::optional<double> timeout,
                                                            bool peer_reads,
                                                            std::int64_t max_count) {
  static bool imported = false;
  if (!imported) {
    if (import_mpi4py() < 0) throw py::error_already_set();
    imported = true;
  }
  MPI_Comm* handle = PyMPIComm_Get(comm.ptr());
  if (handle == nullptr) throw py::error_already_set();  // not an mpi4py communicator
  uaa::MpiOptions options;
  options.timeout_seconds = timeout;
  options.peer_reads = peer_reads;
  options.max_count = max_count;
  const MPI_Comm c = *handle;
  py::gil_scoped_release nogil;  // collective: other Python threads may run meanwhile
  return uaa::make_mpi_communicator(c, options);
}

uaa::DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return uaa::DType::f32;
  if (s == "bf16" || s == "bfloat16") return uaa::DType::bf16;
  throw uaa::Error(uaa::ErrorCode::invalid_argument,
                   "dtype '" + s + "': uaa takes float32 (f32) and bfloat16 (bf16)");
}

uaa::AttentionShape make_shape(std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                               const std::string& dtype, bool causal, float scale, bool return_lse,
                               std::int64_t batch, std::int64_t window_left,
                               std::int64_t window_right) {
  uaa::AttentionShape s;
  s.q_heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.dtype = parse_dtype(dtype);
  s.causal = causal;
  s.scale = scale;
  s.return_lse = return_lse;
  s.batch = batch;
  s.window_left = window_left;
  s.window_right = window_right;
  return s;
}

uaa::PlanOptions make_options(const std::string& strategy, bool allow_mixed_kernels,
                              const std::string& backward_order) {
  uaa::PlanOptions o;
  if (!uaa::parse_strategy(strategy, &o.strategy))
    throw uaa::Error(uaa::ErrorCode::invalid_argument,
                     "strategy '" + strategy + "': uaa, ulysses, ulysses_pad or allgather_kv");
  o.allow_mixed_kernels = allow_mixed_kernels;
  if (backward_order == "canonical")
    o.backward_order = uaa::BackwardOrder::canonical;
  else if (backward_order == "by_rank")
    o.backward_order = uaa::BackwardOrder::by_rank;
  else
    throw uaa::Error(uaa::ErrorCode::invalid_argument,
                     "backward_order '" + backward_order + "': canonical or by_rank");
  return o;
}

using Lens = std::vector<std::int64_t>;
// docs: (q document lengths, kv document lengths or []), or None.
using DocsArg = std::optional<std::pair<Lens, Lens>>;

std::optional<uaa::Documents> make_docs(const DocsArg& docs, const DocsArg& cu_seqlens) {
  if (docs && cu_seqlens)
    throw uaa::Error(uaa::ErrorCode::invalid_argument, "pass docs or cu_seqlens, not both");
  if (docs) return uaa::Documents{docs->first, docs->second};
  if (cu_seqlens) return uaa::Documents::from_cu_seqlens(cu_seqlens->first, cu_seqlens->second);
  return std::nullopt;
}

// What a Python plan's keywords say, parsed once (uaa.Plan, Plan.from_lengths and the lse twin):
// the shape, the options and the documents, or the problem that stopped the parsing (on this rank
// only: Plan.create hands it to the agreement as PlanOptions::caller_problem).
struct PlanSpec {
  uaa::AttentionShape shape;
  uaa::PlanOptions options;
  std::optional<uaa::Documents> docs;
  std::string problem;

  // Points options.caller_problem at `problem` (set, or null); call before each use, as a copy of
  // the spec must not point into the original.
  const uaa::PlanOptions& checked_options() {
    options.caller_problem = problem.empty() ? nullptr : problem.c_str();
    return options;
  }
};

PlanSpec parse_plan_spec(std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                         const std::string& dtype, bool causal, float scale, bool return_lse,
                         std::int64_t batch, std::int64_t window_left, std::int64_t window_right,
                         const DocsArg& docs, const DocsArg& cu_seqlens,
                         const std::string& strategy, bool allow_mixed_kernels,
                         const std::string& backward_order) {
  PlanSpec spec;
  try {
    spec.shape = make_shape(heads, kv_heads, head_dim, dtype, causal, scale, return_lse, batch,
                            window_left, window_right);
    spec.options = make_options(strategy, allow_mixed_kernels, backward_order);
    spec.docs = make_docs(docs, cu_seqlens);
  } catch (const uaa::Error& e) {
    spec.problem = e.what();
  }
  return spec;
}

// A spec of nothing but a problem (Python's own conversions failed).
PlanSpec failed_plan_spec(const std::string& problem) {
  PlanSpec spec;
  spec.problem = problem;
  return spec;
}

uaa::Plan create_plan(uaa::Communicator& comm, std::int64_t q_tokens, std::int64_t kv_tokens,
                      PlanSpec spec) {
  const uaa::PlanOptions& o = spec.checked_options();  // a problem: every rank raises it
  py::gil_scoped_release nogil;
  return spec.docs && spec.problem.empty()
             ? uaa::Plan::create(comm, spec.shape, q_tokens, kv_tokens, *spec.docs, o)
             : uaa::Plan::create(comm, spec.shape, q_tokens, kv_tokens, o);
}

uaa::Plan plan_from_lengths(uaa::Communicator& comm, Lens q_lens, Lens kv_lens, PlanSpec spec) {
  const uaa::PlanOptions& o = spec.checked_options();  // a problem: raised here, this rank only
  return spec.docs && spec.problem.empty()
             ? uaa::Plan::from_lengths(comm, spec.shape, std::move(q_lens), std::move(kv_lens),
                                       *spec.docs, o)
             : uaa::Plan::from_lengths(comm, spec.shape, std::move(q_lens), std::move(kv_lens), o);
}

// The same layout with return_lse (what a call producing the lse, and the backward, need): no
// communication, every field taken from `p`.
uaa::Plan lse_twin(const uaa::Plan& p) {
  uaa::AttentionShape s = p.shape();
  s.return_lse = true;
  if (p.documents().q.size() > 1)
    return uaa::Plan::from_lengths(p.communicator(), s, p.q_lens(), p.kv_lens(), p.documents(),
                                   p.options());
  return uaa::Plan::from_lengths(p.communicator(), s, p.q_lens(), p.kv_lens(), p.options());
}

const char* order_name(uaa::BackwardOrder o) {
  return o == uaa::BackwardOrder::canonical ? "canonical" : "by_rank";
}

py::tuple work_tuple(const uaa::WorkRange& w) {
  return py::make_tuple(w.first_head, w.first_row, w.end_head, w.end_row);
}

void check_rank(const uaa::Plan& p, int r) {
  if (r < 0 || r >= p.ranks())
    throw uaa::Error(uaa::ErrorCode::invalid_argument,
                     "rank " + std::to_string(r) + " outside [0, " + std::to_string(p.ranks()) + ")");
}

}  // namespace

PYBIND11_MODULE(_uaa, m) {
  m.doc() = "uaa: sequence-parallel Ulysses Anything Attention (C++ core; use the `uaa` package)";

  py::register_exception_translator([](std::exception_ptr ptr) {
    if (!ptr) return;
    try {
      std::rethrow_exception(ptr);
    } catch (const uaa::Error& e) {
      set_python_error(e.code(), e.what());
    }
  });

  m.def("mpi_library_version", &mpi_library_version,
        "MPI_Get_library_version() of the MPI this module is linked with");
  m.def("mpi_compiled_vendor", &mpi_compiled_vendor,
        "(name, (major, minor, micro)) of the mpi.h this module was compiled against");
  m.def("kernel_name", [] { return std::string(uaa::kernel_name()); });
  m.def("backward_kernel_name", [] { return std::string(uaa::backward_kernel_name()); });
  m.def("set_num_threads", &uaa::set_num_threads, py::arg("n"));
  m.def("num_threads", &uaa::num_threads);
  m.def("_test_raise", [](const std::string& code, const std::string& message) {
    throw uaa::Error(parse_error_code(code), message);
  }, "Throws uaa::Error(code, message) from C++ (tests of the error translation)");

  py::class_<uaa::Communicator, std::shared_ptr<uaa::Communicator>>(m, "Communicator")
      .def_static("from_mpi4py", &communicator_from_mpi4py, py::arg("comm"),
                  py::arg("timeout") = std::nullopt, py::arg("peer_reads") = true,
                  py::arg("max_count") = std::int64_t{2147483647})
      .def_property_readonly("rank", &uaa::Communicator::rank)
      .def_property_readonly("size", &uaa::Communicator::size)
      .def_property_readonly("transport", [](const uaa::Communicator& c) { return std::string(c.transport()); })
      .def_property_readonly("can_read_peers", &uaa::Communicator::can_read_peers)
      .def_property_readonly("id", &uaa::Communicator::id);

  py::class_<uaa::Workspace>(m, "Workspace")
      .def(py::init<>())
      .def_property_readonly("bytes_reserved", &uaa::Workspace::bytes_reserved)
      .def_property_readonly("grow_count", &uaa::Workspace::grow_count)
      .def_property_readonly("peer_memory",
                             [](const uaa::Workspace& w) { return uaa::last_call(w).peer_memory; });
  m.def("thread_workspace", &thread_workspace, py::return_value_policy::reference,
        "The workspace of this thread (used by calls that pass none)");

  py::class_<uaa::SavedForward>(m, "SavedForward")
      .def(py::init<>())
      .def_property_readonly("valid", &uaa::SavedForward::valid)
      .def_property_readonly("plan_fingerprint", &uaa::SavedForward::plan_fingerprint)
      .def_property_readonly("bytes", &uaa::SavedForward::bytes);

  py::class_<PlanSpec>(m, "PlanSpec")
      .def(py::init(&parse_plan_spec), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("dtype"), py::arg("causal"), py::arg("scale"), py::arg("return_lse"),
           py::arg("batch"), py::arg("window_left"), py::arg("window_right"), py::arg("docs"),
           py::arg("cu_seqlens"), py::arg("strategy"), py::arg("allow_mixed_kernels"),
           py::arg("backward_order"))
      .def_static("failed", &failed_plan_spec, py::arg("problem"))
      .def_readonly("problem", &PlanSpec::problem);

  py::class_<uaa::Plan>(m, "Plan")
      .def_static("create", &create_plan, py::arg("comm"), py::arg("q_tokens"),
                  py::arg("kv_tokens"), py::arg("spec"))
      .def_static("from_lengths", &plan_from_lengths, py::arg("comm"), py::arg("q_lens"),
                  py::arg("kv_lens"), py::arg("spec"))
      .def("lse_twin", &lse_twin)
      .def_property_readonly("ranks", &uaa::Plan::ranks)
      .def_property_readonly("rank", &uaa::Plan::rank)
      .def_property_readonly("communicator",
                             [](const uaa::Plan& p) { return p.communicator().shared_from_this(); })
      .def_property_readonly("q_lens", &uaa::Plan::q_lens)
      .def_property_readonly("kv_lens", &uaa::Plan::kv_lens)
      .def_property_readonly("q_tokens", &uaa::Plan::q_tokens)
      .def_property_readonly("kv_tokens", &uaa::Plan::kv_tokens)
      .def_property_readonly("q_total", &uaa::Plan::q_total)
      .def_property_readonly("kv_total", &uaa::Plan::kv_total)
      .def_property_readonly("batch", &uaa::Plan::batch)
      .def_property_readonly("documents", [](const uaa::Plan& p) {
        return py::make_tuple(p.documents().q, p.documents().kv);
      })
      .def_property_readonly("heads", [](const uaa::Plan& p) { return p.shape().q_heads; })
      .def_property_readonly("kv_heads", [](const uaa::Plan& p) { return p.shape().kv_heads; })
      .def_property_readonly("head_dim", [](const uaa::Plan& p) { return p.shape().head_dim; })
      .def_property_readonly("dtype", [](const uaa::Plan& p) {
        return std::string(p.shape().dtype == uaa::DType::bf16 ? "bfloat16" : "float32");
      })
      .def_property_readonly("causal", [](const uaa::Plan& p) { return p.shape().causal; })
      .def_property_readonly("scale", [](const uaa::Plan& p) { return p.shape().scale; })
      .def_property_readonly("return_lse", [](const uaa::Plan& p) { return p.shape().return_lse; })
      .def_property_readonly("window", [](const uaa::Plan& p) {
        return py::make_tuple(p.shape().window_left, p.shape().window_right);
      })
      .def_property_readonly("strategy", [](const uaa::Plan& p) {
        return std::string(uaa::strategy_name(p.options().strategy));
      })
      .def_property_readonly("allow_mixed_kernels",
                             [](const uaa::Plan& p) { return p.options().allow_mixed_kernels; })
      .def_property_readonly("backward_order", [](const uaa::Plan& p) {
        return std::string(order_name(p.options().backward_order));
      })
      .def("work", [](const uaa::Plan& p, int r) { check_rank(p, r); return work_tuple(p.work(r)); },
           py::arg("rank"))
      .def("q_head_range", [](const uaa::Plan& p, int r) {
        check_rank(p, r);
        return py::make_tuple(p.q_head_begin(r), p.q_head_end(r));
      }, py::arg("rank"))
      .def("kv_head_range", [](const uaa::Plan& p, int r) {
        check_rank(p, r);
        return py::make_tuple(p.kv_head_begin(r), p.kv_head_end(r));
      }, py::arg("rank"))
      .def_property_readonly("bytes_sent", &uaa::Plan::bytes_sent)
      .def_property_readonly("bytes_received", &uaa::Plan::bytes_received)
      .def("backward_bytes_sent", &uaa::Plan::backward_bytes_sent, py::arg("saved") = true)
      .def("backward_bytes_received", &uaa::Plan::backward_bytes_received, py::arg("saved") = true)
      .def_property_readonly("saved_bytes", &uaa::Plan::saved_bytes)
      .def_property_readonly("staging_bytes", &uaa::Plan::staging_bytes)
      .def_property_readonly("fingerprint", &uaa::Plan::fingerprint)
      .def("describe", &uaa::Plan::describe);

  m.def("forward", &forward, py::arg("plan"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse") = py::none(), py::arg("saved") = py::none(),
        py::arg("workspace") = py::none(), py::arg("times") = false);
  m.def("backward", &backward, py::arg("plan"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("saved") = py::none(), py::arg("workspace") = py::none(),
        py::arg("times") = false);
  m.def("last_call_seconds", [] { return g_last_call_seconds; },
        "Wall time of this thread's last forward()/backward() C++ call (benchmarks)");
  m.def("call_seconds_total", [] { return g_call_seconds_total; },
        "Sum of the wall times of this thread's forward()/backward() C++ calls (benchmarks)");
  m.def("time_forward_backward_cpp", &time_forward_backward_cpp, py::arg("plan"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("iters"));
  m.def("fail_forward", &fail_forward, py::arg("plan"), py::arg("message"));
  m.def("time_forward_cpp", &time_forward_cpp, py::arg("plan"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("iters"));
}
