"""The checkpoint file format: names, manifest, safe reading, the elastic (any-layout) part. A leaf: it imports
no other package of timemoe_train, so that `train/` (writes and resumes) and `export/` (reads) share it.

Layout of a run's `checkpoint.dir`:
    step00000100/
        mp_rank_*, zero_pp_rank_*, layer_*_expert_*   DeepSpeed's own files: the fast path, same layout only
        elastic/                      every weight, Adam moment and step count under its released (global) name,
                                      in torch.distributed.checkpoint's format: resumes at any layout
        trainer_state_rank00000.pt    per rank: step, data-loader position, RNG states, guard counters
        meta.json                     model config, parallel layout, expert-name map
        consolidated_model_states.pt  ZeRO-3 only: the gathered weights
        config.yaml                   the resolved run config (secrets removed)
        manifest.json                 size and sha256 of every other file, computed while writing
    latest                the tag of the newest complete checkpoint (DeepSpeed's format)
    best                  with validation on: the tag of the checkpoint with the lowest validation loss
    lineage               the checkpoints of the current lineage, oldest first (resume falls back in this order)
"""

from .files import load_checkpoint_file
from .format import (BEST, CONFIG, CONSOLIDATED, ELASTIC, LATEST, LINEAGE, MANIFEST, META, MODEL_PREFIX, OLD_PREFIX,
                     TMP_PREFIX, CheckpointCorrupt, CheckpointError, CheckpointWriteError, lineage, read_meta,
                     step_tags, tag_for, trainer_state_file)
from .digests import DigestWriter, verify

__all__ = ["BEST", "CONFIG", "CONSOLIDATED", "ELASTIC", "LATEST", "LINEAGE", "MANIFEST", "META", "MODEL_PREFIX",
           "OLD_PREFIX", "TMP_PREFIX", "CheckpointCorrupt", "CheckpointError", "CheckpointWriteError", "DigestWriter",
           "lineage", "load_checkpoint_file", "read_meta", "step_tags", "tag_for", "trainer_state_file", "verify"]
