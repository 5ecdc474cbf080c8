"""scripts/gpu_check.py's machinery on a CPU (its checks need CUDA): the exit without a GPU, the end of a command
that overruns (every process it started, torchrun's workers in their own sessions included), the time budget, how
the DDP check reads a run's output, the benchmark check's reports, and that every command the checks run is valid for
the script it runs."""

import itertools
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import load_script

gpu_check = load_script("gpu_check")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a killed orphan may wait as a zombie for its reaper


def test_without_cuda_it_exits_at_once_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output_dir", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gpu_check.py: CUDA is not available here: nothing to check (this script needs a GPU)"
    assert not (tmp_path / "report").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_command_that_overruns_ends_with_every_process_it_started(monkeypatch, tmp_path):
    """Like torchrun: the command starts a worker in a session of its own that holds its output and ignores
    nothing; on the timeout both end, and the output written so far is kept."""
    monkeypatch.setattr(gpu_check, "TERM_GRACE_S", 1.0)
    pid_file = tmp_path / "worker.pid"
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(worker.pid))
        print("launched", flush=True)
        time.sleep(120)
    """)
    start = time.monotonic()
    ok, output = gpu_check.run([sys.executable, "-c", launcher], 3, gpu_check.Budget(60))
    assert not ok and "launched" in output and "timed out after 3 s" in output
    assert time.monotonic() - start < 30
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_a_spent_budget_runs_nothing_more_and_says_so(tmp_path):
    ok, output = gpu_check.run([sys.executable, "-c", "open('ran', 'w')"], 60, gpu_check.Budget(5))
    assert not ok and output == "not run: the time budget (--budget_s) is spent"
    assert not (Path(gpu_check.ROOT) / "ran").exists()


@pytest.mark.parametrize(
    "output, passed",
    [
        ("; DDP over nccl\nRecompiling function x\nstep 1/10\nstep 2/10\nstep 3/10\n", True),  # warm-up recompile
        ("; DDP over nccl\nstep 2/10\nRecompiling function x\nstep 3/10\n", False),  # a recompile after step 2
        ("; DDP over nccl\nstep 2/10\nGrad strides do not match bucket view strides. ...\n", False),
        ("device cuda:0; precision bf16\nstep 2/10\n", False),  # no process group: DDP never ran
        ("; DDP over nccl\nstep 1/10\n", False),  # stopped before the warm-up ended
    ],
)
def test_the_ddp_check_reads_ddp_stride_warnings_and_recompiles_after_warm_up(monkeypatch, tmp_path, output, passed):
    monkeypatch.setattr(gpu_check, "run", lambda command, timeout, budget, env=None: (True, output))
    result = gpu_check.check_ddp(tmp_path, gpu_check.Budget(60))
    assert result["passed"] is passed


def test_download_wheels_names_a_package_not_installed_here(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "CARRIED", ("einops", "no-such-package-here"))
    assert gpu_check.main(["--download_wheels", str(tmp_path / "whl")]) == 2
    assert "no-such-package-here is not installed here" in capsys.readouterr().out
    assert not (tmp_path / "whl").exists()  # nothing fetched


def test_the_commands_of_the_checks_are_valid_for_their_scripts(monkeypatch, tmp_path):
    """Every train.py, torchrun and benchmark.py command the checks build parses with its script's own parser (here,
    without a GPU), so a renamed or removed flag fails CI rather than the few minutes a lent GPU gives."""
    import ddpm.io.checkpoint

    commands = []

    def record(command, timeout, budget, env=None):
        commands.append(command)
        return True, ""

    monkeypatch.setattr(gpu_check, "run", record)
    monkeypatch.setattr(ddpm.io.checkpoint, "checkpoint_differences", lambda a, b: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # train.py refuses --device cuda without one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for check in (gpu_check.check_precision, gpu_check.check_ddp, gpu_check.check_benchmark):
        check(tmp_path, gpu_check.Budget(60))
    scripts = {name: load_script(name) for name in ("train", "benchmark")}
    parsed = []
    for command in commands:
        if command[1:3] == ["-m", "torch.distributed.run"]:
            launcher = list(itertools.takewhile(lambda arg: arg.startswith("--"), command[3:]))  # before the script
            assert launcher[:2] == ["--standalone", "--nproc_per_node=1"]
            command = [command[0], *command[3 + len(launcher) :]]  # the worker's command, as torchrun runs it
        script, args = Path(command[1]), command[2:]
        assert script.parent == gpu_check.ROOT / "scripts" and script.is_file()
        options = scripts[script.stem].parse_args(args)  # argparse exits (status 2) on an unknown flag or bad value
        parsed.append((script.stem, options))
    names = [name for name, _ in parsed]
    assert names == ["train"] * 6 + ["train"] + ["benchmark"] * 2  # 3 precisions x (straight, resumed), ddp, 2 configs
    precisions = [options.mixed_precision for _, options in parsed[:6]]
    assert precisions == ["no", "no", "fp16", "fp16", "bf16", "bf16"]
    ddp = parsed[6][1]
    assert ddp.compile and ddp.channels_last and ddp.gradient_checkpointing and ddp.gradient_accumulation_steps == 2
    assert all(options.device == "cuda" for _, options in parsed[:7])


def test_the_loader_check_calls_the_loader_benchmark_as_it_is_defined(monkeypatch, tmp_path):
    """The loader check's command body, run here with the two benchmark functions replaced by stand-ins that bind
    its arguments to the real signatures (the real ones take minutes at its sizes) and write the report it reads."""
    import inspect

    from ddpm.evaluation.benchmark import loader

    calls = {}

    def stand_in(real, result):
        def call(*args, **kwargs):
            calls[real.__name__] = inspect.signature(real).bind(*args, **kwargs).arguments  # TypeError if not
            return result

        return call

    rates = {"rows": [{"workers": 4, "folder_img_s": 1.0, "prepared_img_s": 30.0}]}
    monkeypatch.setattr(loader, "make_photo_folder", stand_in(loader.make_photo_folder, tmp_path / "photos"))
    monkeypatch.setattr(loader, "loader_rates", stand_in(loader.loader_rates, rates))
    monkeypatch.setattr(sys, "argv", ["-c", str(tmp_path)])
    exec(compile(gpu_check.LOADER, "<loader check>", "exec"), {})
    assert calls["make_photo_folder"]["count"] == 1024
    assert calls["loader_rates"]["resolution"] == 64 and calls["loader_rates"]["workers"] == (4, 8, 14)
    assert json.loads((tmp_path / "loader.json").read_text()) == rates


def test_the_benchmark_check_keeps_one_configs_figures_when_the_other_fails(monkeypatch, tmp_path):
    """Each config is its own command: the first writes its report, the second overruns; the first's figures are in
    the summary, the check fails and keeps the second's output."""
    figures = {"img_s": 7000.0, "mfu": 0.26, "peak_mem_mb": 9000.0}
    row = {
        "variant": "ours+fused",
        "train": figures,
        "sample": figures,
        "speedup_vs_diffusers": {"train": 1.3, "sample": 1.1},
    }

    def fake_run(command, timeout, budget, env=None):
        config = command[command.index("--config") + 1]
        if config == gpu_check.BENCHMARK_CONFIGS[1]:
            return False, "compiling...\ntimed out after 200 s"
        document = {"results": [{"config": config, "rows": [row]}]}
        Path(command[command.index("--json") + 1]).write_text(json.dumps(document))
        return True, ""

    monkeypatch.setattr(gpu_check, "run", fake_run)
    result = gpu_check.check_benchmark(tmp_path, gpu_check.Budget(60))
    first, second = gpu_check.BENCHMARK_CONFIGS
    assert result["passed"] is False
    assert result["summary"] == {
        f"{first} ours+fused": {
            phase: {**figures, "x_diffusers": ratio} for phase, ratio in row["speedup_vs_diffusers"].items()
        }
    }
    assert list(result["failed_output"]) == [second] and "timed out" in result["failed_output"][second]
