"""DMD2, ADM and DMDX's adversarial pre-training on the same trainer (tiny SDXL pipeline):
each objective trains what it should, the DMD gradient against a hand computation, the
fake score, two time scales, exact resume, and the config's refusals."""

import pytest
import torch
from helpers import config, moved, same_student, snapshot, straight_and_resumed

from nitrofusion.errors import UserError
from nitrofusion.objectives.base import input_gradient, with_gradient
from nitrofusion.objectives.dmd2 import distribution_matching_loss
from nitrofusion.training.config import load_config
from nitrofusion.training.distill import Distiller


def trainables(d):
    """Every module that learns: the student and each critic's modules, by checkpoint name."""
    modules = {"student": d.acc.unwrap_model(d.student)}
    for critic in d.critics.values():
        modules.update(critic.modules)
    return modules


# --- one iteration of each objective -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, learners",
    [
        (["loss.objective=dmd2"], {"student", "fake_score", "classifier"}),
        (["loss.objective=dmd2", "loss.pool_weight=0.5"], {"student", "fake_score", "classifier", "pool"}),
        (["loss.objective=dmd2", "dmd.gan_g_weight=0", "dmd.gan_d_weight=0"], {"student", "fake_score"}),
        (["loss.objective=adm"], {"student", "fake_score", "pool"}),
        (
            ["loss.objective=adm", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1", "pretrain.pixel_crop=4"],
            {"student", "pool", "pixel"},  # DMDX's first iteration: adversarial pre-training, no fake score yet
        ),
    ],
    ids=["dmd2", "dmd2+pool", "dmd2-no-gan", "adm", "dmdx-pretrain"],
)
def test_one_step_moves_student_and_critics(tiny_sdxl_dir, tmp_path, overrides, learners):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False)
    before = {name: snapshot(m) for name, m in trainables(d).items()}
    logs = d.train_step()
    assert "skipped" not in logs
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert {name for name, m in trainables(d).items() if moved(before[name], m)} == learners


def test_dmdx_gets_gradients_into_both_discriminators(tiny_sdxl_dir, tmp_path):
    d = Distiller(
        config(
            tiny_sdxl_dir, tmp_path, "loss.objective=adm", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1"
        ),
        progress=False,
    )
    assert d.phase(0).name == "pretrain" and d.phase(1).name == "distill"
    grads = {}
    for name in ("pool", "pixel"):
        critic = d.critics[name]
        opt = next(iter(critic.optimizers.values()))
        original = opt.step

        def spy(original=original, critic=critic, name=name):
            grads[name] = sum(
                float(p.grad.abs().sum()) for m in critic.modules.values() for p in m.parameters() if p.grad is not None
            )
            original()

        opt.step = spy
    d.train_step()
    assert grads["pool"] > 0 and grads["pixel"] > 0
    # the student's loss includes the pixel critic's: its gradient reaches x0 through the VAE decode
    pixel = d.critics["pixel"]
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    g_loss, _, _ = pixel(x0, torch.randn(2, 4, 8, 8), d.text(["a", "b"]), torch.Generator(), True)
    g_loss.backward()
    assert x0.grad.abs().sum() > 0 and all(p.grad is None for p in pixel.head.parameters())


# --- the maths ----------------------------------------------------------------------------


def test_distribution_matching_gradient_by_hand():
    # L = 0.5 mean_i (x0_i - sg(x0_i - g_i))^2 over N entries  =>  dL/dx0_i = (x0_i - (x0_i - g_i)) / N = g_i / N,
    # g = (fake_x0 - real_x0) w,  w = 1 / mean_{C,H,W} |x0 - real_x0|  (one w per sample).
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
    real_x0, fake_x0 = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    distribution_matching_loss(x0, real_x0, fake_x0).backward()
    w = torch.stack([1 / (x0[b] - real_x0[b]).abs().mean() for b in range(3)]).view(3, 1, 1, 1)
    expected = (fake_x0 - real_x0) * w.detach() / x0.numel()
    torch.testing.assert_close(x0.grad, expected)
    # descent moves x0 towards the real score's prediction and away from the fake score's
    assert float(((x0.grad * -1) * (real_x0 - fake_x0)).sum()) > 0


def test_dmd2_objective_feeds_the_scores_into_the_formula(tiny_sdxl_dir, tmp_path):
    """The trainer's DMD2 term with the two scores replaced by known tensors: the gradient the student's
    x0 receives is (fake_x0 - real_x0) w / N, and the critics' loss sends nothing back to x0."""
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", "dmd.gan_g_weight=0", "dmd.gan_d_weight=0"),
        progress=False,
    )
    cond, _, real = d.batch(0)
    x0 = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    known_real = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    known_fake = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    seen_t = []
    d.objective.real.x0 = lambda x_t, t, c: seen_t.append(t) or known_real
    d.objective.fake.x0 = lambda x_t, t, c: seen_t.append(t) or known_fake
    losses = d.objective(d, x0, real, cond, 0, True)
    losses.g_loss.backward()
    w = 1 / (x0.detach() - known_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x0.grad, (known_fake - known_real) * w / x0.numel())
    assert torch.equal(seen_t[0], seen_t[1]) and all(20 <= int(t) <= 980 for t in seen_t[0])
    x0.grad = None
    losses.d_loss.backward()
    assert x0.grad is None
    # on a critic-only iteration the scores are not even evaluated
    seen_t.clear()
    d.objective(d, x0.detach(), real, cond, 0, False)
    assert seen_t == []


@pytest.mark.parametrize("objective", ["dmd2", "adm"])
def test_student_loss_leaves_the_fake_score_alone(tiny_sdxl_dir, tmp_path, objective):
    """The student's gradient runs through the fake score (ADM) or its classifier (DMD2), but only
    the critics' own loss may write their .grad."""
    d = Distiller(config(tiny_sdxl_dir, tmp_path, f"loss.objective={objective}"), progress=False)
    for critic in d.critics.values():
        critic.begin_step(d)
    cond, noise, real = d.batch(0)
    x0 = (real + 0.1 * noise).requires_grad_(True)
    losses = d.objective(d, x0, real, cond, 0, True)
    losses.g_loss.backward()
    assert x0.grad.abs().sum() > 0
    for critic in d.critics.values():  # the fake score (+ classifier), and ADM's pool
        assert all(p.grad is None for m in critic.modules.values() for p in m.parameters())


def test_with_gradient_is_a_value_with_a_chosen_gradient():
    x = torch.randn(4, requires_grad=True)
    leaf = x.detach().requires_grad_(True)
    value = (leaf**3).sum()
    y = with_gradient(value, x, input_gradient(value, leaf))
    assert torch.equal(y, value.detach())
    y.backward()
    torch.testing.assert_close(x.grad, 3 * x.detach() ** 2)


def test_adversarial_pretraining_adds_the_weighted_regression_to_the_students_loss(tiny_sdxl_dir, tmp_path):
    """pretrain.regression_weight: g_loss = GAN terms + w * MSE(student x0, teacher x0), the critics' loss unchanged."""
    overrides = ["loss.objective=adm", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1"]
    plain = Distiller(config(tiny_sdxl_dir, tmp_path / "a", *overrides), progress=False)
    anchored = Distiller(
        config(tiny_sdxl_dir, tmp_path / "b", *overrides, "pretrain.regression_weight=3"), progress=False
    )
    for d in (plain, anchored):
        for critic in d.trained_critics["pretrain"]:
            critic.begin_step(plain)  # the same heads for both
    cond, noise, real = plain.batch(0)
    fake = plain.student_x0(plain.phase(0), noise, cond, 0, train=True)[0]
    without = plain.pretrain_objective(plain, fake, real, cond, 0, True)
    with_anchor = anchored.pretrain_objective(plain, fake, real, cond, 0, True)
    mse = torch.nn.functional.mse_loss(fake, real)
    torch.testing.assert_close(with_anchor.g_loss, without.g_loss + 3 * mse)
    torch.testing.assert_close(with_anchor.d_loss, without.d_loss)
    assert with_anchor.logs["regression"] == pytest.approx(mse.item())


@pytest.mark.parametrize("objective", ["nitrofusion", "dmd2"])
def test_the_main_stage_anchor_adds_the_weighted_regression_at_the_first_step_only(tiny_sdxl_dir, tmp_path, objective):
    """loss.regression_weight: the student's loss gains w * MSE(student x0, teacher x0) where the
    teacher's x0 comes from the student's own input noise (step 0), and nothing at later steps."""
    stages = ["refine.steps_per_stage=[1,1]", "refine.mix=last", f"loss.objective={objective}"]
    plain = Distiller(config(tiny_sdxl_dir, tmp_path / "a", *stages), progress=False)
    anchored = Distiller(config(tiny_sdxl_dir, tmp_path / "b", *stages, "loss.regression_weight=3"), progress=False)
    seen, objective = [], anchored.objective

    def spy(d, fake, real, *rest):  # what the objective was given: the student's x0, the teacher's
        seen.append((fake.detach().clone(), real.detach().clone()))
        return objective(d, fake, real, *rest)

    anchored.objective = spy
    first_p, first_a = plain.train_step(), anchored.train_step()
    ((fake, real),) = seen
    # The anchor's target is the batch's teacher x0 (from the noise the student started from).
    assert first_a["regression"] == pytest.approx(torch.nn.functional.mse_loss(fake, real).item(), rel=1e-5)
    assert first_a["g_loss"] == pytest.approx(first_p["g_loss"] + 3 * first_a["regression"], rel=1e-5)
    assert first_a["regression"] > 0 and first_a["d_loss"] == pytest.approx(first_p["d_loss"], rel=1e-5)
    anchored.step = 1  # the two-step stage, trained only at its second step (refine.mix=last)
    second = anchored.train_step()
    assert second["index"] == 1 and "regression" not in second


def test_real_score_is_classifier_free_guidance(tiny_sdxl_dir, tmp_path):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", "dmd.real_guidance=3"), progress=False)
    cond, noise, _ = d.batch(0)
    t = torch.tensor([100, 700])
    acp = d.maths.alphas_cumprod
    with torch.no_grad():
        guided = d.objective.real.x0(noise, t, cond)
        # The oracle from the teacher UNet itself, not through scores.unet_x0 (which real.x0 uses).
        x = noise.to(d.teacher.unet.dtype)

        def eps(c):
            embeds, added = c.unet_inputs(x.dtype)
            return d.teacher.unet(x, t, embeds, added_cond_kwargs=added).sample.float()

        e = eps(d.text.negative(2)) + 3 * (eps(cond) - eps(d.text.negative(2)))
        a = acp[t].float()[:, None, None, None]
        expected = (noise.float() - (1 - a).sqrt() * e) / a.sqrt()
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(d.text.negative(1).prompt_embeds) == 0  # SDXL: force_zeros_for_empty_prompt


def test_fake_score_learns_fixed_data(tiny_sdxl_dir, tmp_path):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", "dmd.fake_lr=1e-3"), progress=False)
    fake = d.critics["fake"]
    cond, _, x0 = d.batch(0)
    losses = []
    for _ in range(6):
        loss = fake.denoising_loss(x0, cond, torch.Generator().manual_seed(0))  # same t and noise each time
        loss.backward()
        fake.update(d)
        fake.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_two_time_scales(tiny_sdxl_dir, tmp_path):
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", "loss.d_steps_per_g=3", "refine.steps_per_stage=[4]"),
        progress=False,
    )
    student_moves, fake_moves, logged = [], [], []
    for _ in range(4):
        s, f = snapshot(d.student), snapshot(d.critics["fake"].unet)
        logs = d.train_step()
        d.step += 1
        student_moves.append(moved(s, d.student))
        fake_moves.append(moved(f, d.critics["fake"].unet))
        logged.append({"g_loss", "dm_loss", "fake_loss"} & set(logs))
    assert student_moves == [True, False, False, True]
    assert fake_moves == [True] * 4
    # The student's losses where it learnt only (they were logged as 0 between)
    learnt, critics_only = {"g_loss", "dm_loss", "fake_loss"}, {"fake_loss"}
    assert logged == [learnt, critics_only, critics_only, learnt]


def test_the_tracker_gets_each_value_averaged_over_its_window(tiny_sdxl_dir, tmp_path):
    """With the student stepping every 3rd iteration and a window of 2 iterations, the tracker's
    iteration (the 2nd of each window) was a critic-only one: it showed a student loss of 0 and
    never DMD2's dm_loss."""
    import json

    d = Distiller(
        config(
            tiny_sdxl_dir,
            tmp_path,
            "loss.objective=dmd2",
            "loss.d_steps_per_g=3",
            "refine.steps_per_stage=[4]",
            "run.log_every=2",
        ),
        progress=False,
    )
    logged = []
    d.acc.log = lambda logs, step: logged.append((step, logs))
    d.train()
    lines = [json.loads(line) for line in (d.out / "metrics.jsonl").read_text().splitlines()]
    assert [("g_loss" in r, "dm_loss" in r) for r in lines] == [(True, True), *[(False, False)] * 2, (True, True)]
    assert [step for step, _ in logged] == [2, 4]
    for (_, means), window in zip(logged, (lines[:2], lines[2:])):
        for key in ("g_loss", "dm_loss", "fake_loss", "d_loss"):
            values = [r[key] for r in window if key in r]
            assert means[key] == pytest.approx(sum(values) / len(values)), key


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.objective=dmd2", "loss.d_steps_per_g=2"],
        ["loss.objective=adm", "loss.pretrain_kind=adversarial", "pretrain.pixel_crop=4"],
    ],
    ids=["dmd2", "dmdx"],
)
def test_resume_equals_uninterrupted(tiny_sdxl_dir, tmp_path, overrides):
    common = [*overrides, "refine.steps_per_stage=[2,1]", "run.checkpoint_every=2", "loss.pretrain_steps=1"]
    straight, resumed = straight_and_resumed(tiny_sdxl_dir, tmp_path, *common)
    assert resumed.step == straight.step == 4
    assert same_student(tmp_path / "a", tmp_path / "b")
    for name, critic in straight.critics.items():
        for key, module in critic.modules.items():
            other = resumed.critics[name].modules[key].state_dict()
            assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), key
        for key, opt in critic.optimizers.items():
            mine, theirs = opt.state_dict()["state"], resumed.critics[name].optimizers[key].state_dict()["state"]
            assert all(torch.equal(mine[i][s], theirs[i][s]) for i in mine for s in mine[i]), key


def test_gradient_checkpointing_on_the_fake_score(tiny_sdxl_dir, tmp_path):
    # ADM sends the student's gradient through the checkpointed fake score; R1 differentiates the
    # checkpointed teacher encoder twice.
    cfg = config(tiny_sdxl_dir, tmp_path, "loss.objective=adm", "model.gradient_checkpointing=true", "loss.r1_weight=1")
    d = Distiller(cfg, progress=False)
    assert d.critics["fake"].unet.is_gradient_checkpointing
    assert "skipped" not in d.train_step()


# --- presets and config ----------------------------------------------------------------------


def test_presets_compare_at_equal_compute():
    base = load_config("embedded")
    for name, objective, pretrain in (("dmd2-embedded", "dmd2", "mse"), ("dmdx-embedded", "adm", "adversarial")):
        cfg = load_config(name)
        assert (cfg.loss.objective, cfg.loss.pretrain_kind) == (objective, pretrain)
        assert cfg.data == base.data and cfg.refine == base.refine and cfg.model == base.model
        assert cfg.loss.pretrain_steps == base.loss.pretrain_steps and cfg.total_steps == base.total_steps
        assert cfg.optim.lr == base.optim.lr and cfg.optim.grad_accumulation == base.optim.grad_accumulation
        # The exported EMA averages over as many iterations: it steps with the student, every d_steps_per_g-th.
        horizon = base.optim.ema_decay ** (cfg.loss.d_steps_per_g / base.loss.d_steps_per_g)
        assert cfg.optim.ema_decay == pytest.approx(horizon, abs=1e-3)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.objective=dmd3", "'loss.objective'"),
        ("loss.pretrain_kind=lpips", "'loss.pretrain_kind'"),
        ("loss.pool_weight=0.5", "'loss.pool_weight'"),  # the default objective is nitrofusion
        ("dmd.min_t=0.99", "'dmd.min_t'"),
        ("dmd.fake_min_t=1", "fake_min_t < 1"),
        ("dmd.fake_max_t=1.5", "'dmd.fake_max_t'"),
        ("dmd.classifier_noise=fresh", "'dmd.classifier_noise' must be own or shared"),
        ("discriminator.global_downsamples=-1", "'discriminator.global_downsamples'"),
        ("dmd.real_guidance=-1", "'dmd.real_guidance'"),
        ("dmd.fake_lr=0", "'dmd.fake_lr'"),
        ("dmd.fake_betas=[0.9]", "'dmd.fake_betas'"),
        ("dmd.gan_g_weight=strong", "'dmd.gan_g_weight' must be float"),
        ("dmd.classifier_width=0", "'dmd.classifier_width'"),
        ("dmd.teacher_cfg=3", "unknown config key 'dmd.teacher_cfg'"),
        ("pretrain.pixel_width=0", "'pretrain.pixel_width'"),
        ("pretrain.pixel_crop=-2", "'pretrain.pixel_crop'"),
        ("pretrain.pixel_downsamples=two", "'pretrain.pixel_downsamples' must be int"),
        ("pretrain.regression_weight=-1", "'pretrain.regression_weight'"),
        ("loss.regression_weight=-0.5", "'loss.regression_weight'"),
    ],
)
def test_config_refusals(override, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, None, [override])
    assert fragment in str(err.value)


def test_r1_penalises_the_gradient_of_what_the_losses_average():
    """D(x) = mean over heads of each head's mean logit: the penalty is that gradient's squared norm,
    the same whether the heads are listed once or twice (r1_weight carries across head counts)."""
    from nitrofusion.objectives.adversarial import r1_penalty

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g).requires_grad_(True)
    w_local, w_global = torch.randn(1, 4, 1, 1, generator=g), torch.randn(1, 4, 5, 5, generator=g)
    local = (x * w_local).sum(1, keepdim=True)  # a logit per patch: (3, 1, 5, 5)
    global_ = (x * w_global).sum((1, 2, 3)).unsqueeze(1)  # a logit per image: (3, 1)
    expected_grad = 0.5 * (w_local.expand(1, 4, 5, 5) / 25 + w_global)  # the same for every sample
    expected = expected_grad.square().sum()
    torch.testing.assert_close(r1_penalty([local, global_], x), expected)
    torch.testing.assert_close(r1_penalty([local, global_, local, global_], x), expected)


def test_r1_is_taken_with_respect_to_the_noised_input_the_heads_judge():
    """It was taken with respect to the clean x0, i.e. scaled by abar(t*): the heads of t* 750 were
    regularised 18 times less than those of t* 10."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from nitrofusion.objectives.nitrofusion import NitroFusionObjective

    weight = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    from functools import partial

    from nitrofusion.training.student import add_noise

    class Backbone:  # features = the noised input itself
        model = SimpleNamespace(dtype=torch.float32)

        def __call__(self, x, t, cond):
            return [x]

    pool = SimpleNamespace(
        logits=lambda ids, feats, text: [(feats[0] * weight).sum((1, 2, 3)).unsqueeze(1)],  # D(x_t) = <w, x_t>
        frozen=lambda ids: nullcontext(),
    )
    cond = SimpleNamespace(pooled=None)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t_star in (10, 750):
        losses = []
        for r1 in (0.0, 1.0):
            judge = NitroFusionObjective(Backbone(), pool, partial(add_noise, alphas_cumprod=abar), r1_weight=r1)
            g = torch.Generator().manual_seed(2)
            losses.append(judge(x0, x0, cond, [t_star], {t_star: [0]}, g, train_generator=False).d_loss)
        torch.testing.assert_close(losses[1] - losses[0], weight.square().sum())  # ||dD/dx_t||^2, whatever t*


def test_dmd2_with_a_guidance_distilled_teacher_is_warned_about(tiny_sdxl_dir, tmp_path, caplog):
    """DMD2's and ADM's real score is the teacher at any noise level with CFG on top: a few-step,
    guidance-distilled teacher (sampled at teacher_guidance 0, as DMD2's own 4-step model) is none."""
    with caplog.at_level("WARNING", logger="nitrofusion.training.distill"):
        Distiller(config(tiny_sdxl_dir, tmp_path / "a", "loss.objective=dmd2"), progress=False)
        assert "wrong score" not in caplog.text
        Distiller(
            config(tiny_sdxl_dir, tmp_path / "b", "loss.objective=dmd2", "data.teacher_guidance=0"), progress=False
        )
        assert "gives a wrong score" in caplog.text


def test_gan_losses_by_hand():
    """Both kinds against their formulas written out with math.log/exp, averaged per head over its
    logits (patches and batch), then over heads."""
    import math

    from nitrofusion.objectives.adversarial import discriminator_loss, generator_loss

    real = [torch.tensor([[0.5, -2.0]]), torch.tensor([[3.0]])]
    fake = [torch.tensor([[-1.0, 0.25]]), torch.tensor([[-0.5]])]

    def softplus(x):
        return math.log1p(math.exp(x))

    def mean(values):
        return sum(values) / len(values)

    ns_d = mean(
        [
            mean([softplus(-v) for v in (0.5, -2.0)]) + mean([softplus(v) for v in (-1.0, 0.25)]),
            softplus(-3.0) + softplus(-0.5),
        ]
    )
    ns_g = mean([mean([softplus(-v) for v in (-1.0, 0.25)]), softplus(0.5)])
    hinge_d = mean(
        [
            mean([max(0, 1 - v) for v in (0.5, -2.0)]) + mean([max(0, 1 + v) for v in (-1.0, 0.25)]),
            max(0, 1 - 3.0) + max(0, 1 - 0.5),
        ]
    )
    hinge_g = mean([mean([1.0, -0.25]), 0.5])
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(ns_d)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(ns_g)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(hinge_d)
    assert generator_loss(fake, "hinge").item() == pytest.approx(hinge_g)


@pytest.mark.parametrize("noise", ["own", "shared"])
def test_dmd2s_classifier_and_fake_score_draw_levels_as_dmd2s_do(tiny_sdxl_dir, tmp_path, noise):
    """DMD2 trains its fake score over all of [0, T) and noises the classifier's real and fake inputs
    at a t and noise of their own; here both reused the query's [20, 980] and its x_t (what the
    family presets keep: fake_min_t/fake_max_t 0.02/0.98, classifier_noise shared)."""
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", f"dmd.classifier_noise={noise}"), progress=False
    )
    fake = d.critics["fake"]
    levels = fake.training_timesteps(20_000, torch.Generator().manual_seed(0), "cpu")
    assert int(levels.min()) < 20 and int(levels.max()) > 980
    queried, judged = [], []
    query, logit = fake.x0, fake.logit
    fake.x0 = lambda x_t, t, c: queried.append(t) or query(x_t, t, c)
    fake.logit = lambda x_t, t, c: judged.append(t) or logit(x_t, t, c)
    cond, _, real = d.batch(0)
    d.objective(d, real + 0.1, real, cond, 0, True)
    (t,), (t_fake, both) = queried, judged  # the generator's pass, then the classifier's on real and fake
    t_real = both[: len(t)]
    assert torch.equal(both[len(t) :], t_fake)
    if noise == "shared":
        assert torch.equal(t_fake, t) and torch.equal(t_real, t)
    else:
        assert not torch.equal(t_fake, t) and not torch.equal(t_real, t_fake)


def test_a_dmd2_checkpoint_from_before_dmd2s_own_draws_resumes_saying_what_changed():
    """Keys a checkpoint predates were not counted: a DMD2 run of before resumed with the fake score
    trained over [0, T) and the classifier's own noise, and its log said nothing."""
    import copy

    from nitrofusion.training.config import as_trained
    from nitrofusion.training.distill import changed_settings

    own = ["dmd.fake_min_t=0", "dmd.fake_max_t=1", "dmd.classifier_noise=own"]
    now = load_config("dmd2-embedded", None, own).to_dict()
    old = copy.deepcopy(now)
    for key in ("fake_min_t", "fake_max_t", "classifier_noise"):
        del old["dmd"][key]
    assert changed_settings(old, now) == []
    said = ["dmd.fake_min_t: 0.02 -> 0.0", "dmd.fake_max_t: 0.98 -> 1.0", "dmd.classifier_noise: 'shared' -> 'own'"]
    assert changed_settings(as_trained(old), now) == said
    nitrofusion = load_config("embedded", None, []).to_dict()  # reads no dmd.*: nothing to say
    older = copy.deepcopy(nitrofusion)
    del older["dmd"]["fake_min_t"]
    assert changed_settings(as_trained(older), nitrofusion) == []
