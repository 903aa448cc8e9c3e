"""The module itself: communicators from any mpi4py communicator, the MPI-library check, the
process-wide settings."""

import numpy as np
import pytest
from conftest import P, RANK, WORLD, assert_bitwise, gather_rows, mine, needs_ranks
from mpi4py import MPI

import uaa


def test_communicators(comm):
    assert uaa.Communicator.world() is comm  # made once, shared
    assert (comm.rank, comm.size, comm.transport) == (RANK, P, "mpi")
    assert "rank %d of %d" % (RANK, P) in repr(comm)
    assert WORLD.allgather(comm.can_read_peers) == [comm.can_read_peers] * P
    other = uaa.Communicator(MPI.COMM_WORLD, timeout=30, peer_reads=False)
    assert other.size == P and not other.can_read_peers
    with pytest.raises(TypeError):
        uaa.Communicator([1, 2])
    with pytest.raises(TypeError):
        uaa.Plan(MPI.COMM_WORLD, 3, heads=1, head_dim=8)


@needs_ranks(2)
def test_sub_communicator(self_comm):
    """A uaa communicator over a split of the world: each half runs its own attention, bitwise
    the one-rank result of its own sequence."""
    color = RANK % 2
    sub = MPI.COMM_WORLD.Split(color, RANK)
    ucomm = uaa.Communicator(sub)
    assert ucomm.size == sub.size and ucomm.rank == sub.rank
    total = 45 + color
    lens = [total // sub.size] * sub.size
    lens[-1] += total - sum(lens)
    rng = np.random.default_rng(color)
    Q, K, V = (rng.standard_normal((total, 2, 8), dtype=np.float32) for _ in range(3))
    start, n = mine(lens, sub.rank)
    out = uaa.attention(Q[start:start + n], K[start:start + n], V[start:start + n],
                        uaa.Plan(ucomm, n, heads=2, head_dim=8, causal=True))
    whole = np.concatenate(sub.allgather(out))
    one = uaa.attention(Q, K, V, uaa.Plan(self_comm, total, heads=2, head_dim=8, causal=True))
    assert_bitwise(whole, one, "sub-communicator out")
    sub.Free()


def test_mpi_library_check():
    mine_ = uaa.mpi_library_version()
    assert mine_.strip() == MPI.Get_library_version().strip()  # the import checked this
    assert uaa.mpi_mismatch(mine_, MPI.Get_library_version()) is None
    why = uaa.mpi_mismatch("Open MPI v4.1.4, package: Debian OpenMPI", "MPICH Version:\t4.0.2\n")
    assert "Open MPI v4.1.4" in why and "MPICH Version:" in why and "same MPI library" in why
    assert uaa._uaa.mpi_compiled_vendor() == MPI.get_vendor()
    why = uaa.mpi_mismatch(mine_, mine_, ("MPICH", (4, 0, 2)), ("Open MPI", (4, 1, 4)))
    assert "built against MPICH 4.0.2 but mpi4py against Open MPI 4.1.4" in why


def test_settings():
    assert isinstance(uaa.kernel_name(), str) and uaa.kernel_name()
    assert isinstance(uaa.backward_kernel_name(), str)
    uaa.set_num_threads(1)
    assert uaa.num_threads() == 1
    uaa.set_num_threads(0)
    assert uaa.num_threads() >= 1
    with pytest.raises(uaa.InvalidArgumentError):
        uaa.set_num_threads(-1)
    assert uaa.__version__.count(".") == 2
    gather_rows(np.zeros((1, 1)), 0)  # (conftest helper sanity)


def test_gil_is_released_during_calls(comm):
    """A Python thread keeps running while this rank is inside a long uaa call."""
    import threading
    import time

    total = 3000
    lens = [total // P] * P
    lens[-1] += total - sum(lens)
    start, n = mine(lens)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8, 64), dtype=np.float32)
    plan = uaa.Plan(comm, n, heads=8, head_dim=64)
    ticks, stop = [0], threading.Event()

    def ticker():
        while not stop.is_set():
            time.sleep(0.001)
            ticks[0] += 1

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        before, t0 = ticks[0], time.perf_counter()
        uaa.attention(x, x, x, plan)
        during, seconds = ticks[0] - before, time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
    # With the GIL held the ticker could not return from one sleep during the call.
    got = WORLD.allgather((during, seconds))
    assert all(d >= 5 for d, s in got if s > 0.05), got
