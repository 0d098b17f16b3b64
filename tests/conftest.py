import os
import sys

# Inductor compiles in-process: a pool of compile workers per forked rank would oversubscribe CI's 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

# Workers are forked from the test process: keep it single-threaded so fork never copies a busy OpenMP pool, and
# the suite does not oversubscribe CI's 2 cores.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
