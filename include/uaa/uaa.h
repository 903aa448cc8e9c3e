// uaa/uaa.h — Ulysses Anything Attention: sequence-parallel attention for any sequence length and
// any head count, with no padding. Include this for the whole public API except the transports
// (uaa/mpi.h).
#pragma once

#include "uaa/attention.h"
#include "uaa/backward.h"
#include "uaa/communicator.h"
#include "uaa/error.h"
#include "uaa/plan.h"
#include "uaa/threads.h"
#include "uaa/bf16.h"
#include "uaa/types.h"
