"""benchmarks/compare.py --smoke: the lead starts one worker process per framework (here var-jax alone: the
original's checkout is not part of the tests), alternates its calls and writes the JSON with the machine it ran
on. Tiny sizes, one workload; the times are not looked at."""
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env


def test_smoke_run_writes_records_and_the_machine(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke", "--workloads", "encode",
                           "--json", str(out)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["partial"] and [r["name"] for r in result["records"]] == ["encode"]
    record = result["records"][0]
    assert record["var_jax_s"] > 0 and len(record["var_jax_times_s"]) == 1 and record["reference_s"] is None
    assert record["var_jax_peak_memory_bytes"] > 0 and record["flops"] > 0

    machine = result["machine"]
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert machine["cpu_flags"] == flags and set(machine["cpu_flags_notable"]) <= set(flags)
    assert machine["cpu_count"] == os.cpu_count() and machine["kernel"] == os.uname().release
    assert machine["cpu_model"]
    worker = machine["frameworks"]["var_jax"]
    import jax
    assert worker["jax"] == jax.__version__ and worker["jaxlib"]
    # its own process, which never imported torch
    assert worker["pid"] not in (result["lead_pid"], os.getpid()) and worker["other_framework_loaded"] is False
    start, end = machine["matmul_peak_samples_flops_per_s"]["var_jax"]
    assert start > 0 and end > 0 and machine["matmul_peak_flops_per_s"]["var_jax"] == (start + end) / 2
    assert "| tokenizer encode" in proc.stdout          # the table


def test_bad_workload_and_bad_reference_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/compare.py", "--workloads", "trian"], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "--workloads: unknown 'trian'; choose from ('train', 'train_tokenize', 'sample', 'encode', 'decode') or "
        "('tokenizer', 'all')"]
    proc = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke", "--workloads", "encode",
                           "--reference", str(tmp_path)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"reference worker, 'start': --reference {tmp_path.resolve()}: no models/var.py there "
        "(a checkout of FoundationVision/VAR)")
