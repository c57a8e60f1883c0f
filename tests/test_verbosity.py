"""The API is as quiet as the command line by default; set_verbosity turns the libraries' output back on."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import prospect
import prospect.loading  # noqa: F401  (imported first: the fixture then resets what their import set)
import prospect.pipeline  # noqa: F401
from prospect import verbosity


@pytest.fixture()
def fresh_libraries(monkeypatch, capfd):
    """diffusers and transformers as a new process has them (warnings, bars on), nothing chosen by us yet,
    their log handlers writing to the stderr this test captures."""
    import diffusers
    import transformers

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_warning()
        lib.enable_progress_bar()
        for handler in lib._get_library_root_logger().handlers:
            monkeypatch.setattr(handler, "stream", sys.stderr)
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(verbosity, "_chosen", None)
    yield
    verbosity.set_verbosity("critical")  # as the CLI (the other tests) leave it
    verbosity._chosen = None


def test_api_is_quiet_by_default_and_set_verbosity_turns_it_back_on(tiny_model_dir, fresh_libraries, capfd):
    verbosity.quiet_by_default()  # what importing prospect's pipeline modules does
    pp = prospect.ProSpectPipeline.from_pretrained(tiny_model_dir)
    pp("a cat", image=Image.new("RGB", (16, 16)), strength=1.0, num_inference_steps=2)  # builds the img2img pipeline
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""  # no notes, no safety-checker paragraph, no loading or denoising bars
    prospect.set_verbosity("info")
    pp = prospect.ProSpectPipeline.from_pretrained(tiny_model_dir)
    pp("a cat", image=Image.new("RGB", (16, 16)), strength=1.0, num_inference_steps=2)
    loud = capfd.readouterr().err
    assert "Loading pipeline components" in loud and "safety checker" in loud and "2/2" in loud


@pytest.mark.slow
def test_importing_the_api_makes_it_quiet():
    """The default is applied when the pipeline modules are imported, before diffusers' first import logs."""
    code = "import prospect.pipeline, diffusers, transformers; print(diffusers.utils.logging.get_verbosity(), " \
           "transformers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())"
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_VERBOSITY")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
    assert run.stdout.split() == ["40", "40", "False"]  # logging.ERROR, and no bars


def test_set_verbosity_refuses_unknown_levels():
    with pytest.raises(ValueError, match="unknown verbosity 'loud'; choose one of critical, error, warning, info, debug"):
        prospect.set_verbosity("loud")
    with pytest.raises(ValueError, match="verbosity must be one of"):
        prospect.set_verbosity(None)
