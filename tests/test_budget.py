"""Higher input resolution at equal cost: resizing, the keep-rate solver, budgets and the CLI options."""
import json

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import evit
from conftest import input_for, make_model
from evit import budget as B
from evit import resolution as R
from evit.cli import build_parser, main
from evit import embedded as bundled


def macs_at(model, rate, locations=None):
    evit.patch(model, rate, locations)
    try:
        return evit.count_macs(model)
    finally:
        evit.unpatch(model)


def assert_largest_within(model, rate, budget, locations=None):
    """``rate`` fits ``budget`` and any larger rate (beyond kept_count's 1e-6 slack) does not."""
    assert 0 < rate <= 1
    assert macs_at(model, rate, locations) <= budget
    if rate < 1.0:
        for step in (1e-4, 1e-3):
            assert macs_at(model, min(1.0, rate + step), locations) > budget, (rate, step)


# --- set_input_size ------------------------------------------------------------------------------

def test_set_input_size_changes_tokens_and_resamples_pos_embed_like_timm():
    model = make_model("deit")  # 64 px, patch 16: 4 x 4 patches
    before = model.pos_embed.detach().clone()
    assert B.set_input_size(model, 96) is model
    assert model.patch_embed.img_size == (96, 96) and model.patch_embed.num_patches == 36
    assert model.pos_embed.shape[1] == 36 + 1
    torch.testing.assert_close(model.pos_embed, resample_abs_pos_embed(before, (6, 6), (4, 4), num_prefix_tokens=1))
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 96, 96))
    assert tokens.shape[1] == 37
    assert evit.cost.native_input_size(model) == (3, 96, 96)


def test_set_input_size_keeps_prefix_tokens_and_takes_rectangles():
    model = make_model("dinov2_registers")  # 56 px, patch 14, class token + 4 registers
    B.set_input_size(model, (70, 42))
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 70, 42))
    assert tokens.shape[1] == 5 * 3 + 5


def test_set_input_size_at_the_native_size_changes_nothing():
    model = make_model("deit")
    x = input_for(model)
    with torch.no_grad():
        before = model(x)
    pos = model.pos_embed
    B.set_input_size(model, (3, 64, 64))
    assert model.pos_embed is pos
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_set_input_size_on_a_patched_model():
    model = make_model("deit")
    evit.patch(model, 0.5, [1])
    B.set_input_size(model, 128)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 1000)
    assert evit.token_counts(model, 65) == [65, 1 + 32 + 1]


@pytest.mark.parametrize("size", [30, (64, 70), 8])
def test_set_input_size_rejects_sizes_off_the_patch_grid(size):
    model = make_model("deit")
    with pytest.raises(ValueError, match="multiple of the patch size 16x16"):
        B.set_input_size(model, size)
    assert model.patch_embed.img_size == (64, 64)


def test_set_input_size_rejects_bad_arguments():
    with pytest.raises(TypeError, match="VisionTransformer"):
        B.set_input_size(torch.nn.Linear(2, 2), 32)
    with pytest.raises(ValueError, match="positive"):
        B.set_input_size(make_model("deit"), 0)
    with pytest.raises(TypeError, match="img_size"):
        B.set_input_size(make_model("deit"), 64.0)


# --- the solver ----------------------------------------------------------------------------------

def test_candidate_rates_are_every_step_end():
    assert B.candidate_rates(4).tolist() == [1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0]
    assert B.candidate_rates(1).tolist() == [1.0]


@pytest.mark.parametrize("size", [32, 36, 40])
@pytest.mark.parametrize("share", [1.0, 0.8])
def test_solver_embedded_model_at_larger_inputs(size, share):
    model = bundled.load_model("evit")  # 28 px, patch 4
    budget = int(B.budget_from(model, match_macs=True) * share)
    B.set_input_size(model, size)
    found = B.solve(model, budget, size)
    assert found.keep_rate < 1.0
    assert found.macs == macs_at(model, found.keep_rate) <= budget
    assert_largest_within(model, found.keep_rate, budget)
    assert found.evaluations <= 16  # a handful of forwards, not a sweep
    assert not evit.reductions(model)  # left as it was: unpatched


def test_solver_deit_like_at_288():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4).eval()  # 224 px, patch 16
    budget = B.budget_from(model, match_macs=True)
    assert budget == evit.count_macs(model)
    B.set_input_size(model, 288)  # 18 x 18 = 324 image tokens
    rate = B.solve_keep_rate(model, budget, (3, 288, 288))
    assert 0.4 < rate < 0.9
    assert_largest_within(model, rate, budget)
    # several budgets, other locations
    for gmacs, locations in ((1.0, None), (0.7, [1, 2]), (0.5, [0])):
        budget = int(gmacs * 1e9)
        rate = B.solve_keep_rate(model, budget, 288, locations)
        assert_largest_within(model, rate, budget, locations)


def test_solver_returns_one_when_the_model_fits_unreduced():
    model = make_model("deit")
    native = evit.count_macs(model)
    assert B.solve_keep_rate(model, native) == 1.0
    assert B.solve_keep_rate(model, native - 1) < 1.0


def test_solver_tolerance_stops_early_within_the_budget():
    model = make_model("deit")
    B.set_input_size(model, 128)
    budget = int(0.75 * evit.count_macs(model))
    exact = B.solve(model, budget)
    rough = B.solve(model, budget, tol=0.05)
    assert rough.macs <= budget and exact.keep_rate - 0.05 <= rough.keep_rate <= exact.keep_rate
    assert rough.evaluations <= exact.evaluations


def test_solver_restores_an_existing_patch():
    model = make_model("deit")
    evit.patch(model, 0.3, [2])
    B.solve_keep_rate(model, 0.8 * macs_at(make_model("deit"), 1.0))
    assert list(evit.reductions(model)) == [2] and evit.reductions(model)[2].keep_rate == 0.3


def test_impossible_budget_names_the_least_cost():
    model = make_model("deit")
    B.set_input_size(model, 128)
    least = macs_at(model, 1 / 64)
    with pytest.raises(ValueError, match=rf"even keeping one image token.* costs {least / 1e9:.4g} GMACs"):
        B.solve_keep_rate(model, least - 1)
    assert B.solve_keep_rate(model, least) == pytest.approx(1 / 64)


def test_solver_needs_the_model_at_the_input_size():
    model = make_model("deit")
    with pytest.raises(ValueError, match="set_input_size"):
        B.solve_keep_rate(model, 1e9, 128)
    with pytest.raises(ValueError, match="positive"):
        B.solve_keep_rate(model, 0)


# --- budgets -------------------------------------------------------------------------------------

def test_budget_from():
    model = make_model("deit")
    native = evit.count_macs(model)
    evit.patch(model, 0.5)
    assert B.budget_from(model, match_macs=True) == native  # the unpatched cost, patch or not
    assert evit.reductions(model)  # and the patch stays
    assert B.budget_from(model, macs=0.25) == 250_000_000
    assert B.budget_from(model, speedup=2) == native // 2
    for bad in (dict(), dict(match_macs=True, macs=1.0), dict(macs=1.0, speedup=2.0)):
        with pytest.raises(ValueError, match="exactly one"):
            B.budget_from(model, **bad)
    for bad in (dict(macs=0.0), dict(speedup=-1.0), dict(macs=float("nan"))):
        with pytest.raises(ValueError, match="positive"):
            B.budget_from(model, **bad)


def test_resize_batches():
    x, y = torch.randn(3, 1, 28, 28), torch.arange(3)
    (x2, y2), = R.resize_batches([(x, y)], 36)
    assert x2.shape == (3, 1, 36, 36) and y2 is y
    torch.testing.assert_close(x2.mean(), x.mean(), atol=0.05, rtol=0)
    (x3, _), = R.resize_batches([(x, y)], 28)
    assert x3 is x
    (x4, _), = R.resize_batches([(x, y)], None)
    assert x4 is x


# --- command line --------------------------------------------------------------------------------

def test_cli_budget_options_parse():
    parse = build_parser().parse_args
    args = parse(["eval", "--img-size", "36", "--match-macs"])
    assert (args.img_size, args.match_macs, args.macs, args.speedup, args.keep_rates) == (36, True, None, None, None)
    assert parse(["bench", "--macs", "0.05"]).macs == 0.05
    assert parse(["eval", "--speedup", "1.5"]).speedup == 1.5
    plain = parse(["bench"])
    assert (plain.img_size, plain.match_macs, plain.keep_rates) == (None, False, [1.0, 0.7, 0.5])
    for bad in (["eval", "--keep-rates", "0.5", "--match-macs"], ["bench", "--macs", "1", "--speedup", "2"],
                ["eval", "--speedup", "0"], ["eval", "--img-size", "-3"], ["bench", "--macs", "x"]):
        with pytest.raises(SystemExit):
            parse(bad)


@pytest.fixture
def small_subset(monkeypatch):
    images, labels = bundled.test_subset()
    monkeypatch.setattr("evit.embedded.test_subset", lambda: (images[:96], labels[:96]))


def test_cli_eval_at_a_larger_size_matches_the_native_macs(small_subset, capsys):
    rc = main(["eval", "--img-size", "36", "--match-macs", "--speed-reps", "1", "--batch-size", "48", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    choice, rows = result["budget"], result["rows"]
    assert choice["img_size"] == [36, 36] and choice["native_size"] == [28, 28]
    assert 0 < choice["keep_rate"] < 1 and choice["gmacs"] <= choice["budget_gmacs"] == choice["native_gmacs"]
    assert [(r["model"], r["keep_rate"]) for r in rows] == [
        ("baseline at 28x28", 1.0), ("baseline", 1.0), ("baseline", choice["keep_rate"]),
        ("evit-trained", choice["keep_rate"])]  # first the native model: the gaps are to what the budget matches
    assert rows[0]["gmacs"] == pytest.approx(choice["budget_gmacs"]) and rows[0]["speedup"] == 1.0
    assert rows[1]["gmacs"] > choice["budget_gmacs"]  # unreduced at 36 px costs more
    assert all(r["gmacs"] == pytest.approx(choice["gmacs"]) for r in rows[2:])
    assert all(r["images"] == 96 and r["top1"] > 40 for r in rows)  # resized images, still classified
    assert main(["eval", "--speed-reps", "1", "--batch-size", "48", "--json"]) == 0
    native = json.loads(capsys.readouterr().out)["rows"][0]
    assert native["model"] == "baseline" and native["top1"] == rows[0]["top1"]  # the native row sees 28 px originals


def test_cli_eval_checkpoint_trained_at_a_larger_size_against_the_native_model(small_subset, tmp_path, capsys):
    from evit.checkpoint import save_weights

    run = tmp_path / "evit_36px"
    run.mkdir()
    save_weights(B.set_input_size(bundled.load_model("evit"), 36), run / "model.safetensors")  # "trained at 36 px"
    common = ["--img-size", "36", "--match-macs", "--speed-reps", "1", "--batch-size", "48", "--json"]
    assert main(["eval", "--checkpoint", str(run / "model.safetensors")] + common) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["model"] for r in rows] == ["baseline at 28x28", "baseline", "baseline", "evit_36px"]
    assert main(["eval"] + common) == 0
    bundled_rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[3]["top1"] == bundled_rows[3]["top1"] and rows[3]["gmacs"] == bundled_rows[3]["gmacs"]
    assert rows[3]["top1_gap"] == pytest.approx(rows[3]["top1"] - rows[0]["top1"])  # the gap is to the native model
    assert main(["eval", "--pretrained"]) == 2
    assert "--pretrained needs --model" in capsys.readouterr().err


def test_cli_eval_text_output_prints_the_chosen_rate(small_subset, capsys):
    assert main(["eval", "--img-size", "32", "--speedup", "1.2", "--speed-reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "input 32x32: keep rate 0." in out and "within the budget of" in out
    assert f"; on cpu, {torch.get_num_threads()} threads; speed-ups" in out  # where the speeds were measured


def test_cli_bench_with_a_budget(capsys):
    rc = main(["bench", "--img-size", "40", "--macs", "0.05", "--batch-size", "2", "--reps", "1",
               "--latency-reps", "1", "--warmup", "0", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    rate = result["budget"]["keep_rate"]
    assert [r["keep_rate"] for r in result["rows"]] == [None, rate]
    assert result["rows"][1]["gmacs"] <= 0.05 < result["rows"][0]["gmacs"]


def test_cli_reports_bad_sizes_and_budgets(capsys):
    assert main(["eval", "--img-size", "30", "--match-macs"]) == 2
    assert "multiple of the patch size" in capsys.readouterr().err
    assert main(["bench", "--img-size", "56", "--macs", "0.001"]) == 2
    assert "even keeping one image token" in capsys.readouterr().err
