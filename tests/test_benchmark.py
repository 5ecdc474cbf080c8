"""scripts/benchmark.py: the quick CPU run writes well-formed JSON, and every speed lever keeps the results.

No speed is asserted: CI machines are shared and noisy. The lever tests compare one training step (outputs,
gradients, updated weights) with each lever against the plain eager path, from identical weights.
"""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from helpers import load_script

from ddpm import UNet, UNetConfig
from ddpm.evaluation import benchmark

ROOT = Path(__file__).resolve().parents[1]
script = load_script("benchmark")

CPU = torch.device("cpu")
# Two resolutions, attention with two heads, scale-shift off: every block kind of the UNet in a second of CPU.
TINY = UNetConfig.from_dict(
    dict(
        sample_size=8,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8,
        attention_head_dim=16,
        layers_per_block=1,
    )
).to_dict()


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_writes_well_formed_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    document = script.main(["--quick", "--device", "cpu", "--json", str(out), "--json_only"])
    assert json.loads(out.read_text()) == document
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == document  # the last line printed
    assert document["device"] == "cpu" and document["quick"] is True
    (result,) = document["results"]
    assert result["config"] == "quickstart-digits-16" and result["dtype"] == "fp32" and result["batch_size"] == 2
    assert result["parameters"] == UNet(UNetConfig.from_dict(result["unet_config"])).num_parameters()
    assert result["gflop_per_image"]["train"] > 2 * result["gflop_per_image"]["sample"] > 0
    names = [row["variant"] for row in result["rows"]]
    # diffusers is a test dependency: a quick run without its row is a failure, not a smaller table
    assert names == ["diffusers", "ours", "ours+fused"]
    for row in result["rows"]:
        for phase in ("train", "sample"):
            figures = row[phase]
            assert _finite_positive(figures["img_s"]) and _finite_positive(figures["sec_per_step"])
            assert len(figures["times_s"]) == document["repeats"] == 2
            assert figures["mfu"] is None  # no MFU on CPU
            assert _finite_positive(figures["peak_mem_mb"])  # from a subprocess per row
        assert row["max_abs_diff_vs_first_row"] < 1e-4  # same weights, same inputs: the same outputs
        assert set(row["speedup_vs_diffusers"]) == {"train", "sample"}
    assert "| variant |" in benchmark.format_table(result)


@pytest.mark.parametrize(
    "spec, name",
    [
        ("ours", "ours"),
        ("ours+channels_last+fused", "ours+fused+channels_last"),
        ("diffusers+gc", "diffusers+gc"),
        ("ours+cudagraphs", "ours+compile+cudagraphs"),
    ],
)
def test_variant_names_are_canonical(spec, name):
    assert benchmark.Variant.parse(spec).name == name


@pytest.mark.parametrize("spec", ["theirs", "ours+turbo", "ours+fused+foreach"])
def test_bad_variants_are_refused(spec):
    with pytest.raises(ValueError, match="variant"):
        benchmark.Variant.parse(spec)


def test_bad_config_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit):
        script.main(["--quick", "--config", "no-such-model"])
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "gpu, dtype, tf32, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),
        ("NVIDIA H100 PCIe", "fp16", True, 756.5),
        ("NVIDIA H200", "fp32", True, 494.7),
        ("NVIDIA H200", "fp32", False, 66.9),
        ("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0),
        ("NVIDIA GeForce GTX 1080", "bf16", True, None),
    ],
)
def test_peak_tflops_table(monkeypatch, gpu, dtype, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    assert benchmark.peak_tflops(torch.device("cuda"), dtype, None)[0] == expected
    assert benchmark.peak_tflops(CPU, dtype, None) == (None, None)
    assert benchmark.peak_tflops(CPU, dtype, 123.0)[0] == 123.0


def _one_step(spec: str, config: dict = TINY):
    """Sampling output, then one training step: its gradients (before the update) and updated weights."""
    weights = benchmark.initial_weights(config)
    inputs = benchmark.make_inputs(config, 3, CPU)
    variant = benchmark.Variant.parse(spec)
    runner = benchmark.Runner(variant, config, weights, inputs, CPU, "fp32", 1.0, script.diffusers_reference())
    runner.set_phase("sample")
    sample = runner.sample_step().contiguous()
    runner.set_phase("train")
    grads = {}
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
        for name, p in runner.model.named_parameters()
    ]
    runner.train_step()
    for hook in hooks:
        hook.remove()
    return sample, grads, {k: v.detach().contiguous() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize("spec", ["ours+fused", "ours+foreach", "ours+channels_last", "ours+gc", "ours+fused+gc"])
def test_levers_keep_the_results(spec):
    sample, grads, weights = _one_step("ours")
    sample2, grads2, weights2 = _one_step(spec)
    torch.testing.assert_close(sample2, sample, rtol=1e-5, atol=1e-5)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Adam's first step moves each weight by lr * g / (|g| + eps): for the gradients near eps (1e-8), rounding-level
    # differences in g move the update by a fraction of lr (1e-4); key biases, whose true gradient is 0 (softmax
    # ignores them), are pure rounding noise.
    for name in weights:
        if name not in grads or grads[name].abs().max() > 1e-6:
            torch.testing.assert_close(weights2[name], weights[name], rtol=0, atol=1e-5, msg=name)


def test_diffusers_row_matches_ours():
    sample, grads, weights = _one_step("ours")
    sample2, grads2, weights2 = _one_step("diffusers")
    torch.testing.assert_close(sample2, sample, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _compiled_matches_eager(backend: str, train: bool) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_dict(TINY))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    compiled = torch.compile(model, backend=backend)
    model.train(train)
    with torch.set_grad_enabled(train):
        expected, got = model(x, t), compiled(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if train:
        expected_grads = torch.autograd.grad(expected.square().mean(), list(model.parameters()))
        got_grads = torch.autograd.grad(got.square().mean(), list(model.parameters()))
        for a, b in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_compile_graph_capture_keeps_the_results():
    """torch.compile's graph capture and autograd (aot_eager: no code generation, so seconds not a minute)."""
    _compiled_matches_eager("aot_eager", train=True)


@pytest.mark.slow
def test_compile_inductor_keeps_the_sampling_output():
    """Inductor's generated code (what ``--compile`` runs) keeps the whole model's output. Kept in CI despite its cost
    (about 15 s with a warm inductor cache, 1 to 1.5 min cold on 2 shared cores; a one-level UNet still takes 60 %
    of that, the C++ compile of each fused kernel dominating): it is the only check of that code, and inductor fuses
    operations across module boundaries, so compiling blocks one by one would not check the same code. The aot_eager
    test above covers graph capture and autograd in seconds."""
    _compiled_matches_eager("inductor", train=False)


def test_e2e_is_skipped_without_train_script(monkeypatch, tmp_path):
    monkeypatch.setattr(script, "TRAIN_SCRIPT", tmp_path / "missing.py")
    document = script.main(["--quick", "--variants", "ours+fused", "--no_memory", "--e2e", "--json_only"])
    assert "not found" in document["results"][0]["e2e"]["skipped"]


def test_e2e_runs_train_script(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    document = script.main(
        ["--quick", "--config", str(config), "--variants", "ours+fused", "--no_memory", "--e2e", "--json_only"]
    )
    e2e = document["results"][0]["e2e"]
    assert e2e["raw_row"] == "ours+fused" and e2e["timed_steps"] > 0
    assert _finite_positive(e2e["train_py_img_s"]) and _finite_positive(e2e["ratio"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_run_on_cuda_reports_mfu_and_memory():
    document = script.main(["--quick", "--device", "cuda", "--variants", "ours,ours+fused", "--json_only"])
    for row in document["results"][0]["rows"]:
        for phase in ("train", "sample"):
            assert _finite_positive(row[phase]["peak_mem_mb"])
            if document["results"][0]["peak_tflops"]:
                assert 0 < row[phase]["mfu"] < 1


def test_the_data_benchmark_times_the_loader_and_trains_the_same_weights(tmp_path):
    """scripts/benchmark_data.py on 32 synthetic photographs: the prepared copy is read faster than the JPEGs are
    decoded, and scripts/train.py from either gives the same weights."""
    document = load_script("benchmark_data").main(
        ["--work_dir", str(tmp_path), "--count", "32", "--batch_size", "16", "--workers", "0", "--batches", "4",
         "--train", "--train_steps", "6", "--num_proc", "2"]
    )  # fmt: skip
    (row,) = document["loader"]["rows"]
    assert row["prepared_img_s"] > row["folder_img_s"]
    assert document["train"]["identical_weights"] is True
    assert 0 <= document["train"]["prepared"]["data_wait"] <= 1


def _tiny_loop_config(tmp_path, tiny_unet_json) -> Path:
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            dict(
                dataset_name="builtin:digits",
                model_config_name_or_path=str(tiny_unet_json),
                resolution=8,
                train_batch_size=4,
                logging_steps=2,
                checkpointing_steps=100,
                logger="none",
                seed=0,
                device="cpu",
                ddpm_num_steps=100,
                ddpm_num_inference_steps=2,
                sampler="ddim",
                eval_batch_size=2,
            )
        )
    )
    return config


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_loop_vs_step_trains_each_round_and_compares_it_with_the_raw_step(tmp_path, tiny_unet_json, capsys):
    """scripts/benchmark_loop.py: every round really trains (its own folder, its logged ticks) between two raw
    timings, and the ratios are the logged median over the mean of the raw figures."""
    loop = load_script("benchmark_loop")
    config = _tiny_loop_config(tmp_path, tiny_unet_json)
    result = loop.main(
        ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--rounds", "2", "--steps", "6",
         "--raw_steps", "1", "--json", str(tmp_path / "loop.json")]
    )  # fmt: skip
    assert json.loads((tmp_path / "loop.json").read_text()) == result
    assert list(result["precisions"]) == ["no"] and result["loop_speedup"] == result["raw_speedup"] == {}
    figures = result["precisions"]["no"]
    assert len(figures["rounds"]) == 2
    for index, r in enumerate(figures["rounds"]):
        records = _logged(tmp_path / "out" / f"round-{index}-no")
        assert [record["step"] for record in records] == [2, 4, 6]
        assert r["loop"] == statistics.median(record["img_s"] for record in records[1:])  # the warm-up left out
        assert all(_finite_positive(r[k]) for k in ("raw_before", "loop", "raw_after"))
        assert r["raw"] == pytest.approx((r["raw_before"] + r["raw_after"]) / 2)
        assert r["ratio"] == pytest.approx(r["loop"] / r["raw"])
    assert figures["median_ratio"] == pytest.approx(sum(r["ratio"] for r in figures["rounds"]) / 2)
    assert "no: the loop at" in capsys.readouterr().out


def test_loop_vs_step_alternates_precisions_and_reports_the_loops_speedup(tmp_path, tiny_unet_json, capsys):
    """--mixed_precision no bf16: each round trains under each precision in turn (bf16 really autocast), and the
    speed-up is the median of the rounds' logged loop img/s ratios, against the first precision named."""
    loop = load_script("benchmark_loop")
    config = _tiny_loop_config(tmp_path, tiny_unet_json)
    result = loop.main(
        ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--rounds", "2", "--steps", "6",
         "--raw_steps", "1", "--mixed_precision", "no", "bf16"]
    )  # fmt: skip
    assert list(result["precisions"]) == ["no", "bf16"]
    assert result["precisions"]["bf16"]["resolved"] == "bf16"
    loops = {name: [r["loop"] for r in result["precisions"][name]["rounds"]] for name in ("no", "bf16")}
    for index in range(2):
        for name in ("no", "bf16"):
            run_dir = tmp_path / "out" / f"round-{index}-{name}"
            assert loops[name][index] == statistics.median(record["img_s"] for record in _logged(run_dir)[1:])
    expected = statistics.median(b / a for a, b in zip(loops["no"], loops["bf16"], strict=True))
    assert result["loop_speedup"] == {"bf16": pytest.approx(expected)}
    raws = {name: [r["raw"] for r in result["precisions"][name]["rounds"]] for name in ("no", "bf16")}
    expected = statistics.median(b / a for a, b in zip(raws["no"], raws["bf16"], strict=True))
    assert result["raw_speedup"] == {"bf16": pytest.approx(expected)}
    out, err = capsys.readouterr()
    assert "bf16: the loop at" in out
    headers = [line for line in err.splitlines() if "Model parameters" in line]  # each run's header line
    assert ["precision no;" in h for h in headers] == [True, False] * 2
    assert ["precision bf16;" in h for h in headers] == [False, True] * 2


def test_loop_vs_step_names_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset_name = "builtin:digits"\nlearning_rat = 1e-3\n')
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmark_loop").main(["--config", str(bad), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "Traceback" not in err and not (tmp_path / "out").exists()
