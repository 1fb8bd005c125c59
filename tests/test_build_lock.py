"""Models built by several threads at once, as in one process running ingest and serving
(``serve --ingest``, Beam's in-process runner, two ingest workers): transformers swaps
process-wide functions for no-ops while it loads, and without ``BUILD_LOCK`` concurrent
loads left them in place for good (untied LM head, uninitialized layers, meta tensors).
The race runs in a child process, so a failure cannot spoil the other tests' models."""

from __future__ import annotations

import subprocess
import sys
import textwrap

RACE = textwrap.dedent(
    """
    import threading

    import torch
    from transformers import PreTrainedModel

    from knowstream.models.encoder import TextEncoder
    from knowstream.models.inference import _load_amortizer, load_amortizer

    def fresh_amortizer():  # past load_amortizer's cache: a new build each time
        return _load_amortizer.__wrapped__("init", "cpu", "float32")
    from knowstream.models.lm import load_lm

    originals = (
        PreTrainedModel.tie_weights,
        PreTrainedModel.init_weights,
        torch.nn.init.kaiming_uniform_,
        torch.nn.init.normal_,
    )
    errors = []

    def build(i):
        try:
            for _ in range(2):
                (load_lm, TextEncoder, fresh_amortizer)[i % 3]()
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    now = (
        PreTrainedModel.tie_weights,
        PreTrainedModel.init_weights,
        torch.nn.init.kaiming_uniform_,
        torch.nn.init.normal_,
    )
    lm, _ = load_lm()
    tied = lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    same_init = fresh_amortizer().version == load_amortizer("init").version
    print("errors", errors)
    print("intact", all(a is b for a, b in zip(originals, now)))
    print("tied", tied, "init", same_init)
    """
)


def test_models_built_in_parallel_threads_leave_the_process_able_to_build_models():
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines == ["errors []", "intact True", "tied True init True"], out.stdout[-3000:]
