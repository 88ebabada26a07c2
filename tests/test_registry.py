"""A new method is its own code plus one registry line: the command line, compare and bench derive from it."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import evit
from evit import embedded
from evit.cli import build_parser, main
from evit.compare import grid
from evit.methods import KeepRateReduction, kept_count
from evit.registry import names, unregister

METHOD_SOURCE = '''
import torch

import evit
from evit.methods import KeepRateReduction, kept_count


@evit.register  # the one registry line
class LargestNorm(KeepRateReduction):
    """Keeps the image tokens of largest norm: a made-up method, small enough to read at a glance."""

    name, label, needs_class_token = "largestnorm", "Largest norm", False
    compare_grid = bench_grid = (0.5,)

    def __init__(self, keep_rate=0.7, fuse=False):
        super().__init__(keep_rate, fuse=False)

    def forward(self, x, seen):
        p, n = self.num_prefix_tokens, x.shape[1] - self.num_prefix_tokens
        k = kept_count(self.keep_rate, n)
        if k >= n:
            return x
        keep = x[:, p:].norm(dim=-1).topk(k, dim=1).indices
        return torch.cat([x[:, :p], x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
'''


@pytest.fixture
def largest_norm():
    """The method above, defined and registered here (and forgotten afterwards, so other tests see evit's own)."""
    scope: dict = {}
    exec(compile(METHOD_SOURCE, "largest_norm", "exec"), scope)
    yield scope["LargestNorm"]
    unregister("largestnorm")


def _choices(parser, command: str, option: str) -> list:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).choices


def test_a_registered_method_appears_everywhere_without_other_edits(largest_norm, tmp_path, capsys):
    assert "largestnorm" in names()
    parser = build_parser()
    assert "largestnorm" in _choices(parser, "compare", "--methods")
    assert "largestnorm" in _choices(parser, "bench", "--method")
    assert "largestnorm" in _choices(parser, "show", "--method")
    assert "largestnorm" not in _choices(parser, "export", "--method"), "export offers only methods it tests"
    # compare's grid and defaults come from the class
    settings, skipped = grid(["largestnorm"], None, None)
    assert settings == [("baseline", 1.0), ("baseline", {"method": "largestnorm", "keep_rate": 0.5})] and not skipped
    from evit import embedded
    from evit.commands import _serving_methods

    assert parser.parse_args(["compare"]).methods is None  # the default: every method that can serve the model
    assert _serving_methods(embedded.load_model("baseline"))[-1] == "largestnorm", "compare runs every method by default"
    # compare runs it, on the embedded model and bundled images
    assert main(["compare", "--methods", "largestnorm", "--speed-reps", "1", "--batch-size", "1000",
                 "--plot", str(tmp_path / "c.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], r["keep_rate"]) for r in rows] == [("none", 1.0), ("largestnorm", 0.5)]
    assert rows[1]["gmacs"] < rows[0]["gmacs"] and rows[1]["series"] == "Largest norm (baseline)"
    # bench runs it by name, with its own default setting, beside its ideal
    assert main(["bench", "--method", "largestnorm", "--batch-size", "2", "--reps", "1", "--latency-reps", "1",
                 "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["variant"] for r in rows] == ["unpatched", "largestnorm"]
    assert rows[1]["keep_rate"] == 0.5 and rows[1]["tokens"] == [50, 26, 14, 8] and rows[1]["gmacs"] < rows[0]["gmacs"]
    # and evit.patch knows it by name; it keeps what it says
    model = evit.patch(embedded.load_model("baseline"), 0.5, method="largestnorm")
    assert type(evit.reductions(model)[1]) is largest_norm
    x = torch.randn(2, 50, 8)
    out = evit.reductions(model)[1](x, None)
    assert out.shape == (2, 26, 8) and torch.equal(out[:, 0], x[:, 0])
    kept = out[:, 1:].norm(dim=-1).sort(dim=1).values
    torch.testing.assert_close(kept, x[:, 1:].norm(dim=-1).topk(25, dim=1).values.sort(dim=1).values)


def test_registering_refuses_what_it_cannot_name(largest_norm):
    class Nameless(KeepRateReduction):
        pass

    with pytest.raises(ValueError, match="own lower-case `name`"):
        evit.register(Nameless)
    with pytest.raises(ValueError, match="already registered"):
        evit.register(type("Other", (KeepRateReduction,), {"name": "largestnorm"}))
    with pytest.raises(ValueError, match="setting must be one of"):
        evit.register(type("Odd", (KeepRateReduction,), {"name": "odd", "setting": "k"}))
    with pytest.raises(TypeError, match="TokenReduction subclass"):
        evit.register(int)
    assert "odd" not in names() and kept_count(0.5, 7) == 4


def test_a_method_from_another_package_is_found_by_its_entry_point(tmp_path):
    """A package declaring ``[evit.methods] largestnorm = largest_norm_plugin``: the evit command finds it."""
    (tmp_path / "largest_norm_plugin.py").write_text(METHOD_SOURCE)
    info = tmp_path / "largest_norm_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: largest-norm-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[evit.methods]\nlargestnorm = largest_norm_plugin\n")
    src = Path(evit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(src)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "evit.cli", "bench", "--method", "largestnorm", "--batch-size", "2",
                           "--reps", "1", "--latency-reps", "1", "--warmup", "0", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"][1]["tokens"] == [50, 26, 14, 8]
    broken = textwrap.dedent("""\
        [evit.methods]
        nothing = no_such_module_here
        """)
    (info / "entry_points.txt").write_text(broken)
    proc = subprocess.run([sys.executable, "-m", "evit.cli", "bench", "--method", "evit"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "plugin 'nothing' (no_such_module_here) failed to load" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_option_the_method_does_not_take_is_refused(capsys):
    """--keep-rates (or a budget that picks one) with ToMe, --r with EViT: refused, not silently ignored."""
    from evit.cli import main

    for args, words in ((["bench", "--method", "tome", "--keep-rates", "0.5"], "--keep-rates sets a keep rate"),
                        (["bench", "--method", "tome", "--speedup", "1.5"], "--speedup sets a keep rate"),
                        (["bench", "--method", "evit", "--r", "4"], "--r sets r"),
                        (["compare", "--methods", "evit", "topk", "--r", "3"], "which evit, topk do not take")):
        assert main([*args, "--reps" if args[0] == "bench" else "--speed-reps", "1"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
