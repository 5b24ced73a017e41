"""Byzantine attacks: formulas against hand computation, registry, errors, adaptivity."""

from __future__ import annotations

import pickle

import pytest
import torch

from tuneguard.aggregators import aggregate
from tuneguard.attacks import ATTACKS, AttackSpec, craft

HONEST = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], dtype=torch.float64)
# mean (3, 6); Bessel-corrected std: sqrt((4 + 0 + 4) / 2) = 2 and sqrt((16 + 0 + 16) / 2) = 4.
VECTOR_ATTACKS = [name for name, spec in ATTACKS.items() if not spec.data_attack]


def test_registry_flags_and_duplicates():
    expected = {
        "little", "empire", "sign_flip", "gaussian", "nan", "inf", "zero", "mimic", "adaptive",
        "label_flip",
    }  # fmt: skip
    assert expected <= set(ATTACKS)
    assert all(isinstance(s, AttackSpec) for s in ATTACKS.values())
    assert {n for n, s in ATTACKS.items() if s.data_attack} == {"label_flip"}
    assert {n for n, s in ATTACKS.items() if s.needs_generator} == {"gaussian"}
    assert {"little", "empire", "adaptive", "mimic"} <= {
        n for n, s in ATTACKS.items() if s.omniscient
    }
    assert not ATTACKS["gaussian"].omniscient
    with pytest.raises(ValueError, match="already registered"):
        ATTACKS.register(ATTACKS["little"])
    assert ATTACKS["little"].params["zeta"] == 1.0
    assert ATTACKS["empire"].params["zeta"] == 1.1


def test_specs_pickle():
    for spec in ATTACKS.values():
        assert pickle.loads(pickle.dumps(spec)) == spec


def test_little_formula():
    out = craft("little", HONEST, 2)
    assert out.shape == (2, 2) and out.dtype == torch.float64
    assert out.tolist() == [[1.0, 2.0], [1.0, 2.0]]  # mean - std
    assert craft("little", HONEST, 1, zeta=2.0).tolist() == [[-1.0, -2.0]]
    assert craft("little", HONEST[:1], 1).tolist() == [[1.0, 2.0]]  # one honest vector: std 0


def test_little_is_accurate_in_float32_under_a_large_common_offset():
    # The one-pass std must not cancel: values 1000 + 0.01 N(0, 1) in float32 (squares ~1e6,
    # float32 ulp 0.06 there, six orders above the variance 1e-4).
    gen = torch.Generator().manual_seed(2)
    honest64 = 1000.0 + 0.01 * torch.randn(12, 5000, generator=gen, dtype=torch.float64)
    honest = honest64.float()
    std64 = honest.double().std(dim=0)
    out = craft("little", honest, 3)
    assert out.dtype == torch.float32 and torch.equal(out[0], out[2])
    # to the float32 resolution of the output (ulp 6.1e-5 at 1000); a cancelling formula would
    # be off by ~0.06 / 0.01 in relative terms
    spread = honest.double().mean(dim=0) - out[0].double()
    assert torch.allclose(spread, std64, rtol=1e-3, atol=1.5e-4)
    # and h = 2 (Bessel: the two values' distance / sqrt 2)
    two = craft("little", honest[:2], 1)[0].double()
    assert torch.allclose(honest[:2].double().mean(0) - two, honest[:2].double().std(0), rtol=1e-3, atol=1.5e-4)


def test_empire_and_sign_flip_formulas():
    expected = torch.tensor([[-0.3, -0.6]] * 3, dtype=torch.float64)
    assert torch.allclose(craft("empire", HONEST, 3), expected)  # (1 - 1.1) * mean
    assert torch.allclose(craft("empire", HONEST, 1, zeta=0.5), 0.5 * HONEST.mean(0))
    assert craft("sign_flip", HONEST, 2).tolist() == [[-3.0, -6.0]] * 2
    assert craft("sign_flip", HONEST, 1, scale=2.0).tolist() == [[-6.0, -12.0]]


def test_constant_attacks_and_mimic():
    assert torch.isnan(craft("nan", HONEST, 2)).all()
    assert torch.isposinf(craft("inf", HONEST, 2)).all()
    assert torch.equal(craft("zero", HONEST, 2), torch.zeros(2, 2, dtype=torch.float64))
    assert craft("mimic", HONEST, 2).tolist() == [[1.0, 2.0]] * 2
    assert craft("mimic", HONEST, 1, target=2).tolist() == [[5.0, 10.0]]
    with pytest.raises(ValueError, match="0 <= target < h = 3"):
        craft("mimic", HONEST, 1, target=3)


def test_gaussian_is_deterministic_given_a_generator():
    honest = torch.zeros(4, 5000)
    a = craft("gaussian", honest, 3, generator=torch.Generator().manual_seed(1))
    b = craft("gaussian", honest, 3, generator=torch.Generator().manual_seed(1))
    c = craft("gaussian", honest, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each worker draws its own vector
    assert a.std().item() == pytest.approx(200.0, rel=0.05)
    assert craft("gaussian", honest, 1, sigma=1.0).std().item() == pytest.approx(1.0, rel=0.1)
    default = craft("gaussian", honest, 2)  # documented: a generator seeded 0
    assert torch.equal(
        default, craft("gaussian", honest, 2, generator=torch.Generator().manual_seed(0))
    )
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        craft("gaussian", honest, 1, generator=3)


@pytest.mark.parametrize("name", VECTOR_ATTACKS)
def test_f_zero_gives_empty_and_shapes_follow_input(name):
    params = {"gar": "median"} if name == "adaptive" else {}
    honest = torch.randn(12, 7, dtype=torch.float32)
    empty = craft(name, honest, 0, **params)
    assert empty.shape == (0, 7) and empty.dtype == torch.float32
    out = craft(name, honest, 3, **params)
    assert out.shape == (3, 7) and out.dtype == torch.float32 and out.device == honest.device


def test_unknown_names_and_params_list_valid_ones():
    with pytest.raises(ValueError, match="unknown attack 'litle'; valid attacks: little, empire"):
        craft("litle", HONEST, 1)
    with pytest.raises(ValueError, match="little takes no parameter 'sigma'; its parameters: zeta"):
        craft("little", HONEST, 1, sigma=1.0)
    with pytest.raises(ValueError, match="its parameters: none"):
        craft("nan", HONEST, 1, zeta=1.0)
    with pytest.raises(ValueError, match="f \\(number of Byzantine vectors\\) must be an integer"):
        craft("little", HONEST, -1)
    with pytest.raises(ValueError, match="shape \\[h, d\\]"):
        craft("little", HONEST[0], 1)


def test_label_flip_is_left_to_the_engine():
    assert ATTACKS["label_flip"].data_attack
    with pytest.raises(ValueError, match="data attack.*training engine"):
        craft("label_flip", HONEST, 2)


def test_adaptive_validates_its_rule_up_front():
    honest = torch.randn(8, 4)
    with pytest.raises(ValueError, match="needs gar=.*krum"):
        craft("adaptive", honest, 3)
    with pytest.raises(ValueError, match="n = h \\+ f = 11.*bulyan needs n >= 4f \\+ 3"):
        craft("adaptive", honest, 3, gar="bulyan")
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        craft("adaptive", honest, 3, gar="nope")
    with pytest.raises(ValueError, match="base must be 'little' or 'empire'"):
        craft("adaptive", honest, 3, gar="median", base="gaussian")
    with pytest.raises(ValueError, match="takes no parameter 'm'"):
        craft("adaptive", honest, 3, gar="median", gar_params={"m": 2})


def _damage(gar: str, honest: torch.Tensor, byz: torch.Tensor, **params) -> float:
    out = aggregate(gar, torch.cat([honest, byz]), byz.shape[0], **params)
    return (out - honest.mean(0)).norm().item()


def test_adaptive_beats_fixed_zeta():
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(12, 50, generator=gen, dtype=torch.float64) + 0.5
    gains = {}
    for gar in ("krum", "median", "trimmed_mean", "mda"):
        for base in ("little", "empire"):
            fixed = _damage(gar, honest, craft(base, honest, 3, zeta=1.0))
            tuned = _damage(gar, honest, craft("adaptive", honest, 3, gar=gar, base=base))
            assert tuned >= fixed - 1e-9, (gar, base)
            gains[gar, base] = tuned / fixed
    assert max(gains.values()) > 1.2, gains


def test_adaptive_leaves_the_servers_generator_untouched():
    honest = torch.randn(12, 10)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out = craft(
        "adaptive", honest, 3, gar="bucketing+median", gar_params={"generator": gen, "s": 2}
    )
    assert torch.equal(gen.get_state(), state)
    assert out.shape == (3, 10)
    zetas_only = craft("adaptive", honest, 3, gar="median", zetas=[0.0, 1.0], refine=0)
    little = craft("little", honest, 3)
    zero_zeta = craft("little", honest, 3, zeta=0.0)
    assert torch.equal(zetas_only, little) or torch.equal(zetas_only, zero_zeta)
