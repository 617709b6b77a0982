"""Bad input at the front door: every option of every sub-command is checked when the command line is parsed.

Each row feeds one option a bad value through the command's ``main(argv)`` in this process: exit status 2, one
line on stderr naming the option and what it allows, no traceback, nothing written. Two rows also run the real
``fastdiff`` process.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.cli import main

# (sub-command, option, bad value, a piece of the message saying what is allowed)
BAD = [
    ("generate", "--model", "{tmp}/nope", "path does not exist"),
    ("generate", "--height", "30", "multiple of 8"),
    ("generate", "--height", "0", "multiple of 8"),
    ("generate", "--width", "abc", "multiple of 8"),
    ("generate", "--init-image", "{tmp}/nope.png", "file does not exist"),
    ("generate", "--init-image", "{tmp}", "file does not exist"),
    ("generate", "--strength", "1.5", "[0, 1]"),
    ("generate", "--strength", "-0.1", "[0, 1]"),
    ("generate", "--mask", "{tmp}/nope.png", "file does not exist"),
    ("generate", "--controlnet", "{tmp}/nope", "path does not exist"),
    ("generate", "--control-image", "{tmp}/nope.png", "file does not exist"),
    ("generate", "--control-image", "{tmp}", "file does not exist"),
    ("generate", "--control-scale", "-0.5", "[0, inf)"),
    ("generate", "--control-scale", "strong", "[0, inf)"),
    ("generate", "--n", "-3", "integer >= 1"),
    ("generate", "--n", "0", "integer >= 1"),
    ("generate", "--n", "two", "integer >= 1"),
    ("generate", "--sampler", "foo", "choose from 'ddpm', 'ddim', 'euler', 'euler_a', 'dpmpp_2m', 'flow_euler'"),
    ("generate", "--steps", "0", "integer >= 1"),
    ("generate", "--steps", "-5", "integer >= 1"),
    ("generate", "--guidance", "-1", "[0, inf)"),
    ("generate", "--guidance", "nan", "[0, inf)"),
    ("generate", "--seed", "-1", "integer >= 0"),
    ("generate", "--seed", "1.5", "integer >= 0"),
    ("generate", "--out", "{tmp}/missing/x.png", "does not exist"),
    ("generate", "--out", "{tmp}", "must be a file path"),
    ("generate", "--threads", "0", "integer >= 1"),
    ("generate", "--device", "tpu", "cpu, cuda or cuda:N"),
    ("generate", "--lora", "{tmp}/nope.safetensors:0.8", "file does not exist"),
    ("generate", "--lora", "{tmp}/nope.safetensors", "file does not exist"),
    ("generate", "--device", "cuda:x", "cpu, cuda or cuda:N"),
    ("generate", "--sketch", "{tmp}/nope.png", "file does not exist"),
    ("generate", "--sketch", "{tmp}", "file does not exist"),
    ("generate", "--quantize", "int4", "must be one of int8"),
    ("train", "--model", "unet9000", "choose from 'fashion32', 'cifar10_ddpm', 'tiny'"),
    ("train", "--model-overrides", "[1, 2]", "JSON object"),
    ("train", "--model-overrides", "{bad", "JSON object"),
    ("train", "--image-size", "4", "integer >= 8"),
    ("train", "--schedule", "sigmoid", "choose from 'linear', 'scaled_linear', 'cosine'"),
    ("train", "--prediction", "score", "choose from 'eps', 'v', 'x0'"),
    ("train", "--num-train-timesteps", "0", "integer >= 1"),
    ("train", "--batch-size", "0", "integer >= 1"),
    ("train", "--grad-accum", "-1", "integer >= 1"),
    ("train", "--lr", "0", "(0, inf)"),
    ("train", "--warmup-steps", "-1", "integer >= 0"),
    ("train", "--weight-decay", "-0.1", "[0, inf)"),
    ("train", "--optimizer", "sgd", "choose from 'adamw', 'adamw8bit'"),
    ("train", "--grad-clip", "-1", "[0, inf)"),
    ("train", "--ema-decay", "1", "[0, 1)"),
    ("train", "--class-dropout", "1.5", "[0, 1]"),
    ("train", "--precision", "fp8", "choose from 'bf16', 'fp32', 'fp16'"),
    ("train", "--device", "tpu", "choose from 'cpu', 'cuda'"),
    ("train", "--threads", "0", "integer >= 1"),
    ("train", "--seed", "-2", "integer >= 0"),
    ("train", "--max-steps", "0", "integer >= 1"),
    ("train", "--log-every", "0", "integer >= 1"),
    ("train", "--sample-every", "-1", "integer >= 0"),
    ("train", "--sample-steps", "0", "integer >= 1"),
    ("train", "--sample-guidance", "-2", "[0, inf)"),
    ("train", "--samples-per-class", "0", "integer >= 1"),
    ("train", "--ckpt-every-minutes", "0", "(0, inf)"),
    ("train", "--ckpt-every-steps", "-1", "integer >= 0"),
    ("train", "--gpu-memory", "0", "(0, inf)"),
    ("train", "--kind", "vae", "choose from 'diffusion', 'autoencoder'"),
    ("train", "--conditioning", "caption", "choose from 'class', 'text'"),
    ("train", "--text-encoder", "huge", "choose from 'sd15'"),
    ("train", "--autoencoder", "{tmp}/nope", "path does not exist"),
    ("train", "--recon-loss", "l3", "choose from 'l1', 'l2'"),
    ("train", "--kl-weight", "-1", "[0, inf)"),
    ("train", "--base", "{tmp}/nope", "path does not exist"),
    ("train", "--data", "{tmp}/nope", "path does not exist"),
    ("train", "--rank", "0", "integer >= 1"),
    ("train", "--alpha", "0", "(0, inf)"),
    ("train", "--control", "depth", "choose from 'canny'"),
    ("eval", "--images", "{tmp}/nope.npz", "path does not exist"),
    ("eval", "--checkpoint", "{tmp}/nope", "path does not exist"),
    ("eval", "--autoencoder", "{tmp}/nope", "folder does not exist"),
    ("eval", "--sampler", "foo", "NAME one of ddpm, ddim, euler, euler_a, dpmpp_2m"),
    ("eval", "--sampler", "ddim:0", "steps must be >= 1"),
    ("eval", "--sampler", "ddim:x", "bad step count"),
    ("eval", "--steps", "0", "integer >= 1"),
    ("eval", "--per-class", "0", "integer >= 1"),
    ("eval", "--guidance", "-1", "[0, inf)"),
    ("eval", "--spacing", "random", "choose from 'leading', 'trailing', 'linspace'"),
    ("eval", "--clip", "-1", "(0, inf)"),
    ("eval", "--clip", "wide", "(0, inf)"),
    ("eval", "--precision", "fp16", "choose from 'bf16', 'fp32'"),
    ("eval", "--seed", "-1", "integer >= 0"),
    ("eval", "--batch", "0", "integer >= 1"),
    ("eval", "--classifier", "{tmp}/nope.safetensors", "file does not exist"),
    ("eval", "--data", "{tmp}/nope", "folder does not exist"),
    ("eval", "--inception", "{tmp}/nope.pth", "file does not exist"),
    ("eval", "--inception-real", "0", "integer >= 1"),
    ("eval", "--save-samples", "{tmp}/missing/deeper", "does not exist"),
    ("eval", "--json", "{tmp}/missing/r.json", "does not exist"),
    ("eval", "--threads", "0", "integer >= 1"),
]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command,option,value,allowed", BAD, ids=[f"{c}{o}={v}" for c, o, v, _ in BAD])
def test_bad_option_value_is_one_line_and_exit_2(tmp_path, capsys, command, option, value, allowed):
    value = value.replace("{tmp}", str(tmp_path))
    base = {"eval": ["--checkpoint", str(tmp_path)] if option not in ("--images", "--checkpoint", "--autoencoder")
                 else [],
            "generate": ["--out", str(tmp_path / "out.png")] if option != "--out" else [],
            "train": ["--run-dir", str(tmp_path / "run")]}[command]
    before = set(tmp_path.rglob("*"))
    code, err = _run([command, *base, option, value], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"argument {option}" in lines[0] and allowed in lines[0], lines[0]
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_every_option_of_every_subcommand_has_a_bad_value_row():
    """A new option must join the table above (or be listed here as taking any value)."""
    from fastdiff.cli import build_parser

    any_value = {"--prompt", "--negative-prompt", "--label", "--run-dir", "--dataset", "--resume", "--no-progress",
                 "--print-config", "--plan", "--hflip", "--no-hflip", "--grad-checkpointing",
                 "--no-grad-checkpointing", "--lora-text-encoder", "--no-lora-text-encoder", "--cache", "--no-cache",
                 "--show-process", "--interpolate", "--quiet", "--raw-weights",
                 "--betas", "-h", "--help", "--kernels", "--quick", "--roofline"}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {(c, o) for c, o, _, _ in BAD}
    for command, parser in sub.choices.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in any_value:
                    assert (command, flag) in covered, f"fastdiff {command} {flag} has no bad-value row"


def test_betas_and_mask_rules(tmp_path, capsys):
    code, err = _run(["train", "--betas", "0.9", "1.0"], capsys)
    assert code == 2 and "argument --betas: must be a number in [0, 1)" in err
    code = main(["generate", "--mask", str(Path(__file__)), "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2 and "argument --mask: needs --init-image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    here = str(Path(__file__))
    for argv, msg in ((["--control-image", here], "argument --control-image: needs --controlnet"),
                      (["--controlnet", here], "argument --controlnet: needs --control-image"),
                      (["--controlnet", here, "--control-image", here], "argument --controlnet: needs --prompt")):
        code = main(["generate", *argv, "--out", str(tmp_path / "x.png"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


def test_eval_samplers_are_library_samplers():
    from fastdiff.eval import cli as eval_cli
    from fastdiff.samplers import SAMPLERS

    assert set(eval_cli._SAMPLERS) <= set(SAMPLERS)


@pytest.mark.parametrize("argv,msg", [(["generate", "--n", "-3"], "argument --n: must be an integer >= 1, got -3"),
                                      (["generate", "--sampler", "foo"], "argument --sampler: invalid choice: 'foo'")])
def test_real_process_smoke(tmp_path, argv, msg):
    r = subprocess.run([sys.executable, "-m", "fastdiff", *argv, "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and r.stderr.startswith(f"fastdiff generate: error: {msg}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == "" and not (tmp_path / "x.png").exists()
