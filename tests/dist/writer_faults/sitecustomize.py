"""Test-only faults in checkpoint writing, for every Python process started with this folder on PYTHONPATH (the
launcher, torchrun and the trainers):
  TIMEMOE_TEST_WRITE_LAG_S=S        a background write (off the main thread) waits S seconds before the first byte
                                    of each checkpoint: the write lags training, as on a GPU, where a step is faster
                                    than a write
  TIMEMOE_TEST_WRITE_FAULT=R:STEP:K  rank R's write of the step-STEP checkpoint fails at its first byte, K=fail
                                    (OSError ENOSPC, which names no file) or hangs there, K=hang
"""

import errno
import os
import threading
import time

LAG_S = float(os.environ.get("TIMEMOE_TEST_WRITE_LAG_S", "0"))
FAULT = os.environ.get("TIMEMOE_TEST_WRITE_FAULT")

if LAG_S or FAULT:
    from timemoe_train.checkpoint.digests import DigestWriter

    write, lagged = DigestWriter.write, set()

    def checkpoint_of(path) -> str:
        return next((part for part in path.parts if part.startswith(".tmp-step")), "")

    def faulty_write(self, data):
        tag = checkpoint_of(self.path)
        if LAG_S and tag not in lagged and threading.current_thread() is not threading.main_thread():
            lagged.add(tag)
            time.sleep(LAG_S)
        if FAULT:
            rank, step, kind = FAULT.split(":")
            if os.environ.get("RANK", "0") == rank and tag == f".tmp-step{int(step):08d}":
                if kind == "hang":
                    while True:
                        time.sleep(60)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)

    DigestWriter.write = faulty_write
