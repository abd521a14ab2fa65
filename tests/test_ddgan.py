"""DDGAN / LDDGAN: schedule, posterior, Weighted Learning, AdaGN, R1, autoencoder, end-to-end."""

import math

import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.methods.autoencoder import AutoencoderMethod, gaussian_kl_penalty, latent_statistics
from diffaccel.methods.ddgan import DDGAN, r1_penalty, weighted_learning_weight
from diffaccel.methods.ddgan_schedule import ddgan_schedule
from diffaccel.nets.autoencoder import build_autoencoder, psnr
from diffaccel.nets.ddgan import build_discriminator, build_generator


def _closed_form_alpha_bar(T, i, beta_min=0.1, beta_max=20.0):
    def log_alpha(s):
        return -0.25 * s * s * (beta_max - beta_min) - 0.5 * s * beta_min

    s = lambda k: k / T * (1 - 1e-3) + 1e-3  # noqa: E731
    return math.exp(2 * (log_alpha(s(i)) - log_alpha(s(0))))


@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_schedule_matches_closed_form(T):
    sched = ddgan_schedule(T)
    expected = torch.tensor([_closed_form_alpha_bar(T, i) for i in range(T + 1)], dtype=torch.float64)
    torch.testing.assert_close(sched.alpha_bars, expected, rtol=1e-12, atol=1e-14)
    # the betas chain back to the marginals
    torch.testing.assert_close(torch.cumprod(1 - sched.betas, 0), sched.alpha_bars, rtol=1e-12, atol=1e-14)
    assert sched.alpha_bars[0] == 1 and torch.all(sched.betas[1:] > 0) and torch.all(sched.betas < 1)


def test_schedule_t4_values_from_design():
    got = ddgan_schedule(4).sqrt_alpha_bars
    torch.testing.assert_close(got, torch.tensor([1, 0.72232, 0.28049, 0.05856, 0.00657], dtype=torch.float64),
                               atol=2e-5, rtol=0)


def test_schedule_rejects_bad_T():
    for bad in (0, 9, -1):
        with pytest.raises(UserError):
            ddgan_schedule(bad)


@pytest.mark.parametrize("T", [2, 4, 8])
def test_posterior_matches_gaussian_conditioning(T):
    """q(x_{t-1}|x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    sched = ddgan_schedule(T)
    x0, xt = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.3], dtype=torch.float64)
    for t in range(1, T + 1):
        a_prev, a_t, b = sched.alpha_bars[t - 1].item(), sched.alpha_bars[t].item(), sched.betas[t].item()
        var_prev = 1 - a_prev
        cov = math.sqrt(1 - b) * var_prev                 # Cov(x_{t-1}, x_t | x_0)
        var_t = (1 - b) * var_prev + b                    # Var(x_t | x_0) (= 1 - alpha_bar_t)
        assert var_t == pytest.approx(1 - a_t, rel=1e-12)
        mean = math.sqrt(a_prev) * 0.7 + cov / var_t * (-0.3 - math.sqrt(a_t) * 0.7)
        var = var_prev - cov**2 / var_t
        tt = torch.tensor([t])
        got_mean = sched.posterior_mean(x0.double().view(1, 1), xt.double().view(1, 1), tt).item()
        assert got_mean == pytest.approx(mean, abs=1e-12)
        assert sched.posterior_var[t].item() == pytest.approx(var, abs=1e-12)


def test_forward_pairs_and_posterior_samples_have_the_right_moments():
    """Monte Carlo (n = 200k, tolerance ~6 standard errors): q_pair's joint moments and posterior sampling."""
    torch.manual_seed(0)
    sched = ddgan_schedule(4)
    n, t = 200_000, 3
    x0 = torch.full((n, 1), 0.5, dtype=torch.float64)
    tt = torch.full((n,), t)
    x_prev, x_t = sched.q_pair(x0, tt)
    a_prev, a_t, b = (sched.alpha_bars[t - 1].item(), sched.alpha_bars[t].item(), sched.betas[t].item())
    assert x_t.mean().item() == pytest.approx(math.sqrt(a_t) * 0.5, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a_t, abs=0.01)
    cov = ((x_prev - x_prev.mean()) * (x_t - x_t.mean())).mean().item()
    assert cov == pytest.approx(math.sqrt(1 - b) * (1 - a_prev), abs=0.01)
    # posterior samples given a fixed x_t
    xt_fixed = torch.full((n, 1), 0.2, dtype=torch.float64)
    s = sched.posterior_sample(x0, xt_fixed, tt)
    assert s.mean().item() == pytest.approx(sched.posterior_mean(x0[:1], xt_fixed[:1], tt[:1]).item(), abs=0.01)
    assert s.var().item() == pytest.approx(sched.posterior_var[t].item(), rel=0.02)
    # the last step (t = 1) is deterministic and returns x_0 itself
    one = torch.ones(4, dtype=torch.long)
    torch.testing.assert_close(sched.posterior_sample(x0[:4], xt_fixed[:4], one), x0[:4])


def test_weighted_learning_weight():
    assert weighted_learning_weight(0, 100) > 0.99
    assert weighted_learning_weight(50, 100) == pytest.approx(0.5, abs=1e-12)
    assert weighted_learning_weight(100, 100) < 0.01
    ws = [weighted_learning_weight(e, 100) for e in range(101)]
    assert all(a > b for a, b in zip(ws, ws[1:]))
    # eq. 9 with δ = 6 at the start: 1 - sigmoid(-6)
    assert weighted_learning_weight(0, 10, 6.0) == pytest.approx(1 - 1 / (1 + math.exp(6)), rel=1e-12)
    with pytest.raises(UserError):
        weighted_learning_weight(1, 0)


def test_generator_loss_weight_follows_gen_loss_option():
    assert DDGAN(gen_loss="adv").reconstruction_weight(0) == 0
    assert DDGAN(gen_loss="adv+rec").reconstruction_weight(123) == 1.0
    m = DDGAN(gen_loss="adv+rec+wl")
    with pytest.raises(RuntimeError):
        m.reconstruction_weight(0)
    m.on_train_start(1000)
    assert m.reconstruction_weight(500) == pytest.approx(0.5)
    with pytest.raises(UserError):
        DDGAN(gen_loss="wl")


def test_adagn_generator_depends_on_z():
    torch.manual_seed(0)
    G = build_generator("tiny", 2, 8)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    z1, z2 = torch.randn(3, G.nz), torch.randn(3, G.nz)
    y1, y2 = G(x, t, z1), G(x, t, z2)
    assert y1.shape == x.shape and y1.abs().max() <= 1
    assert (y1 - y2).abs().mean() > 1e-3
    torch.testing.assert_close(G(x, t, z1), y1)  # deterministic given z
    z = z1.clone().requires_grad_(True)
    G(x, t, z).sum().backward()
    assert z.grad.abs().sum() > 0
    # and on t
    assert (G(x, t + 1, z1) - y1).abs().mean() > 1e-4


def test_discriminator_shapes_and_time_conditioning():
    torch.manual_seed(0)
    D = build_discriminator("tiny", 2)
    a, b = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    out = D(a, b, torch.ones(4))
    assert out.shape == (4,)
    assert not torch.allclose(out, D(a, b, 3 * torch.ones(4)))
    assert D(torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.ones(4)).shape == (4,)


def test_r1_penalty_matches_analytic_gradient():
    w = torch.tensor([0.5, -2.0, 3.0]).view(1, 3, 1, 1).requires_grad_(True)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    d = (w * x**2).sum(dim=(1, 2, 3))        # D(x) = Σ w x²  ->  ∇D = 2 w x
    pen = r1_penalty(d, x)
    expected = (2 * w * x).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(pen, expected.detach())
    pen.sum().backward()                     # differentiable w.r.t. D's parameters (create_graph)
    torch.testing.assert_close(w.grad, (8 * w * x**2).sum(dim=(0, 2, 3), keepdim=True).detach())


def test_training_phases_keep_networks_apart_and_apply_lazy_r1():
    torch.manual_seed(0)
    m = DDGAN(T=2, r1_gamma=10.0, lazy_reg=3)
    nets = m.build_networks({"preset": "tiny"}, (1, 8, 8))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    phases = m.phases()
    assert [p.networks for p in phases] == [("discriminator",), ("generator",)]
    opt = phases[0].optimizer(nets["discriminator"].parameters(), 1e-3)
    assert opt.defaults["betas"] == (0.5, 0.9)
    m.generator_loss(nets, x0, 1).backward()
    assert all(p.grad is None for p in nets["discriminator"].parameters())
    assert any(p.grad is not None for p in nets["generator"].parameters())
    for p in nets["generator"].parameters():
        p.grad = None
    torch.manual_seed(1)
    with_r1, health = m.discriminator_loss(nets, x0, 3)
    torch.manual_seed(1)
    without, health_without = m.discriminator_loss(nets, x0, 4)
    assert with_r1.item() > without.item()
    # the health record: mean logits on real and fake pairs, and R1 only on the steps that compute it
    assert set(health) == {"d_real", "d_fake", "r1"} and set(health_without) == {"d_real", "d_fake"}
    assert health["r1"].item() > 0 and not health["d_real"].requires_grad
    assert with_r1.item() - without.item() == pytest.approx(10.0 / 2 * health["r1"].item(), abs=1e-6)
    assert all(not p.clip for p in phases) and all(p.clip for p in DDGAN(T=2, gan_clip=True).phases())
    assert (phases[0].lr, phases[1].lr) == (1.25e-4, 1.6e-4)
    with_r1.backward()
    assert all(p.grad is None for p in nets["generator"].parameters())


def test_sampling_is_T_generator_calls():
    torch.manual_seed(0)
    m = DDGAN(T=4)
    G = build_generator("tiny", 1, 8)
    calls = []
    G.register_forward_hook(lambda mod, inp, out: calls.append(inp[1].clone()))
    g = torch.Generator().manual_seed(0)
    x = m.sample(G, 3, (1, 8, 8), generator=g)
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    assert [int(c[0]) for c in calls] == [4, 3, 2, 1] and m.nfe() == 4
    x2 = m.sample(G, 3, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)


@pytest.mark.parametrize("factor", [2, 4])
def test_autoencoder_round_trip_and_latent_range(factor):
    torch.manual_seed(0)
    ae = build_autoencoder("tiny", 1, 16, factor=factor, latent_channels=3).eval()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        h = ae.encode(x)
        assert h.shape == (6, 3, 16 // factor, 16 // factor) == (6, *ae.latent_shape)
        recon, vq = ae.decode(h)
        assert recon.shape == x.shape and vq.ndim == 0
        stats = latent_statistics(h)
        ae.latent_shift.copy_(torch.tensor(stats["shift"]))
        ae.latent_scale.fill_(stats["scale"])
        z = ae.encode_scaled(x)
        assert z.std().item() == pytest.approx(1.0, abs=1e-5)  # latent diffusion's unit-std scaling
        torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(ae.decode_scaled(z), recon, atol=1e-5, rtol=1e-4)
    assert psnr(x, x + 0.02).mean().item() == pytest.approx(10 * math.log10(4 / 0.0004), rel=1e-5)
    with pytest.raises(UserError):
        build_autoencoder("tiny", 1, 18, factor=4)


def test_kl_penalty_is_zero_for_standard_normal_latents():
    torch.manual_seed(0)
    assert gaussian_kl_penalty(torch.randn(64, 4, 16, 16)).item() < 1e-3
    assert gaussian_kl_penalty(3 + 2 * torch.randn(64, 4, 16, 16)).item() == pytest.approx(
        0.5 * (9 + 4 - 1 - math.log(4)), rel=0.02)
    with pytest.raises(UserError):
        AutoencoderMethod(factor=3)


def _train_cfg(out, **kw):
    from diffaccel.train import TrainConfig

    base = dict(data="digits", resolution=8, data_limit=48, net={"preset": "tiny"}, batch_size=16, steps=3,
                out=str(out), log_every=1, checkpoint_every=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_end_to_end_autoencoder_then_latent_ddgan(tmp_path):
    from diffaccel.methods.ddgan import LDDGAN
    from diffaccel.runs import load_run
    from diffaccel.train import train

    torch.manual_seed(0)
    ae_run = train(_train_cfg(tmp_path / "ae"), AutoencoderMethod(factor=2, latent_channels=2, perceptual_weight=0,
                                                                   holdout=8), progress=False, log=lambda *_: None)
    assert (ae_run / "samples.png").is_file()
    m = LDDGAN(autoencoder=str(ae_run), T=2, lazy_reg=2)
    run = train(_train_cfg(tmp_path / "ld"), m, progress=False, log=lambda *_: None)
    assert (ae_run / "latent_stats.json").is_file() and list((ae_run / "latents").iterdir())
    method, nets = load_run(run)
    assert nets["generator"].in_channels == 2 and nets["generator"].output == "identity"  # latents: no tanh
    x = method.sample(nets["generator"], 5, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8) and x.abs().max() <= 1 and method.nfe() == 2
    # the cached latents are the scaled encodings, of unit std on the autoencoder's own training data
    from diffaccel.methods.autoencoder import training_images
    from diffaccel.data import ImageDataset

    lat = m.prepare(ImageDataset(training_images(ae_run), "digits"), "cpu")
    assert lat.shape == (2, 4, 4) and lat.images.float().std().item() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(UserError):
        LDDGAN(autoencoder=str(tmp_path / "missing"))


@pytest.mark.slow  # one tiny autoencoder and five tiny models, evaluated: tens of seconds
def test_lddgan_benchmark_quick_runs_on_the_harness(tmp_path):
    from diffaccel.bench.lddgan import run

    summary = run(tmp_path / "out", quick=True, seeds=1)
    rows = {(r["model"], r["sampler"]): r for r in summary["rows"]}
    assert list(rows) == [("DDPM", "DDIM-20"), ("DDPM", "DDPM-1000"), ("Latent DDPM", "DDIM-20"),
                          ("DDGAN (pixel)", "T=4"), ("LDDGAN adv", "T=4"), ("LDDGAN adv+rec", "T=4"),
                          ("LDDGAN adv+rec+WL", "T=4"), ("LDDGAN adv+rec+WL f=2", "T=4"),
                          ("LDDGAN adv+rec+WL KL-AE", "T=4")]
    assert rows[("LDDGAN adv+rec+WL", "T=4")]["nfe"] == 4 and rows[("DDPM", "DDPM-1000")]["nfe"] == 50
    assert all(r["seconds_per_100_images"].mean > 0 for r in rows.values())
    final = rows[("LDDGAN adv", "T=4")]["per_seed"][0]
    assert len(final["timing_trial_seconds"]) == 2  # seconds per 100 images: the median of timed trials
    # three autoencoders, each trained once and shared by the rows naming it
    assert [r["autoencoder"] for r in summary["extra"]["autoencoders"]] == ["f2", "f4", "f4-kl"]
    assert all(r["PSNR dB"] > 0 for r in summary["extra"]["autoencoders"])
    # every GAN row reports its discriminator's final logit gap; the DDPM rows have none
    assert {r["model"] for r in summary["extra"]["discriminators"]} == {
        m for m, _ in rows if "GAN" in m}
    for name in ("results.json", "results.md"):
        assert (tmp_path / "out" / name).is_file()
