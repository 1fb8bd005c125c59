"""One lock for building torch models in a process that runs several threads.

While ``from_pretrained`` builds a model, transformers swaps process-wide functions for
no-ops (``torch.nn.init``'s initializers, ``PreTrainedModel.tie_weights`` and
``init_weights``) and puts them back after. Two threads loading at once can put the no-ops
back for good: every model built later in the process is then untied, uninitialized or left
on the meta device (measured here: four threads loading the LM and MiniLM). One process runs
ingest and serving in threads (``serve --ingest``, Beam's in-process runner, two ingest
workers in tests), so every model build in knowstream holds this lock, and so does building
MAC networks, whose layers draw their initial weights from those same initializers.
"""

from __future__ import annotations

import threading

BUILD_LOCK = threading.RLock()  # re-entrant: load_lm converts the GGUF file inside its load
