"""The foundation: import isolation, the native extension behind the op names, real assets."""

import subprocess
import sys

import torch

from mofast.assets import DEFAULT_OBJECTIVES, STORIES260K


def test_kernels_import_without_transformers_or_datasets():
    code = (
        "import sys, mofast.kernels; "
        "bad = [m for m in ('transformers', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_native_extension_is_the_cpu_implementation():
    import mofast.kernels  # noqa: F401
    from mofast.kernels import _native

    assert _native.NATIVE_LIBRARY.endswith(".so")
    for name in ("gram", "combine", "min_norm"):
        op = getattr(torch.ops.mofast, name).default
        # The CPU kernel is a C++ function registered by the extension, not Python.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        table = torch._C._dispatch_dump_table(op.name())
        assert "CPU: registered at" in table and ".cpp" in table.split("CPU: registered at")[1]


def test_shipped_model_is_real():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES260K)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park. One day, she saw a big, red ball."
    ), text


def test_shipped_data_is_real():
    import gzip
    import json

    for path in DEFAULT_OBJECTIVES.values():
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 1000
        assert all({"prompt", "chosen", "rejected"} <= row.keys() for row in rows)


def test_repository_root_on_sys_path_does_not_shadow_hf_kernels():
    # `python -m pytest` and `python -m mofast` put the repository root on sys.path, where
    # the `kernels/` folder would otherwise hide Hugging Face's `kernels` from transformers.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import kernels, mofast.kernels; "
        "from transformers import AutoConfig; "
        "from mofast.assets import STORIES260K; "
        "AutoConfig.from_pretrained(STORIES260K); "
        "assert kernels is not mofast.kernels and not hasattr(kernels, '_native')"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=root)
