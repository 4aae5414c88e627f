"""benchmarks/gpu_llava7b.py end to end with tiny shapes on CPU, so the GPU script stays runnable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_llava7b.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_llava7b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_tiny_on_cpu(tmp_path):
    script = _load_script()
    out = tmp_path / "out"
    code = script.main(["--tiny", "--device", "cpu", "--out", str(out), "--max-tokens", "8", "--repeats", "1",
                        "--prompt-words", "8", "--checkpoint-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert [row["system"] for row in result["results"]] == ["hf", "plain"]
    assert all(row["output_tokens_per_request"] == 8 for row in result["results"])
    assert [row["tree_tokens"] for row in result["verify"]] == script.TREE_SIZES
    assert all(row["seconds"] > 0 for row in result["verify"])
    assert "Verify cost against tree size" in (out / "results.md").read_text()
    assert (out / "chart.png").stat().st_size > 0


def test_gpu_script_full_shape_has_7b_parameters():
    import torch
    from transformers import LlavaForConditionalGeneration

    script = _load_script()
    config = script.llava_config(script.FULL_SHAPE, image_token_id=32000)
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaForConditionalGeneration(config)
    # llava-hf/llava-1.5-7b-hf has 7,063,427,072 parameters.
    assert sum(parameter.numel() for parameter in model.parameters()) == 7_063_427_072
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 == 576
