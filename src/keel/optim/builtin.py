"""Registry records: the optimizers torch implements (used as they are, not rewritten) and keel's own.

torch's defaults are kept, except the default LRs, which are the starting points named in `docs/optimizers.md`, and
`fused` / `foreach`: left null, `create` chooses them for the parameters' devices (`torch_class` below;
`keel.optim.torch_kernels`), so AdamW, Adam and SGD run torch's fused kernels on CPU.
"""

from __future__ import annotations

import torch

from keel.errors import KeelError
from keel.optim.ademamix import AdEMAMix
from keel.optim.hypergradient import AdamHD, SGDHD
from keel.optim.lion import Lion
from keel.optim.muon import MAX_NS_STEPS, NS_DTYPES, MuonWithAdamW, muon_missing, muon_split
from keel.optim.playbook import PlaybookAdam, PlaybookNAdam, PlaybookRMSProp
from keel.optim.registry import (
    Hparam,
    OptimizerSpec,
    betas,
    boolean,
    integer_in,
    length,
    nonnegative,
    one_of,
    optional,
    positive,
    positive_int,
    register,
    unit_interval,
)
from keel.optim.soap import MATMUL_PRECISIONS, SOAP

_WD = Hparam(0.0, nonnegative, "weight decay (coupled: added to the gradient)")
_FUSED = Hparam(None, optional(boolean), "torch's fused kernel (null: keel uses it where torch has one for the device)")
_FOREACH = Hparam(
    None, optional(boolean), "torch's multi-tensor path (null: keel uses it where the device has fast foreach kernels)"
)
_FORM = Hparam("torch", one_of("torch", "playbook"),
               "'torch': torch's implementation; 'playbook': the Tuning Playbook FAQ's rule as written "
               "(keel.optim.playbook)")


def _rmsprop(groups, lr, form="torch", **kw):
    if form == "torch":
        return torch.optim.RMSprop(groups, lr=lr, **kw)
    if kw.get("centered"):
        raise KeelError("optimizer.centered: true has no Playbook form; allowed with form: playbook: false")
    return PlaybookRMSProp(groups, lr=lr, rho=kw["alpha"], momentum=kw["momentum"], eps=kw["eps"],
                           weight_decay=kw["weight_decay"])


def _nadam(groups, lr, form="torch", **kw):
    if form == "torch":
        return torch.optim.NAdam(groups, lr=lr, **kw)
    if kw.get("decoupled_weight_decay"):
        raise KeelError("optimizer.decoupled_weight_decay: true has no Playbook form; allowed with form: playbook: "
                        "false")
    return PlaybookNAdam(groups, lr=lr, betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"])


def _adam(groups, lr, form="torch", **kw):
    if form == "torch":
        return torch.optim.Adam(groups, lr=lr, **kw)
    if kw.get("amsgrad"):
        raise KeelError("optimizer.amsgrad: true has no Playbook form; allowed with form: playbook: false")
    return PlaybookAdam(groups, lr=lr, betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"])


def _sgd(momentum: float, nesterov: bool):
    def build(groups, lr, **kw):
        kw.setdefault("momentum", momentum)
        return torch.optim.SGD(groups, lr=lr, nesterov=nesterov, **kw)

    return build


register(
    OptimizerSpec(
        "sgd",
        "plain stochastic gradient descent: p <- p - lr g",
        "Robbins & Monro 1951; torch.optim.SGD",
        lr=0.1,
        hparams={"weight_decay": _WD, "foreach": _FOREACH, "fused": _FUSED},
        build=_sgd(0.0, False),
        torch_class=torch.optim.SGD,
    )
)
register(
    OptimizerSpec(
        "momentum",
        "heavy-ball momentum: v <- mu v + g; p <- p - lr v",
        "Polyak 1964; torch.optim.SGD(momentum=mu)",
        lr=0.01,
        hparams={
            "momentum": Hparam(0.9, unit_interval, "momentum coefficient mu"),
            "dampening": Hparam(0.0, unit_interval, "v <- mu v + (1 - dampening) g"),
            "weight_decay": _WD,
            "foreach": _FOREACH,
            "fused": _FUSED,
        },
        build=_sgd(0.9, False),
        torch_class=torch.optim.SGD,
    )
)
register(
    OptimizerSpec(
        "nesterov",
        "Nesterov momentum: v <- mu v + g; p <- p - lr (g + mu v)",
        "Nesterov 1983, Sutskever et al. 2013; torch.optim.SGD(nesterov=True)",
        lr=0.01,
        hparams={
            "momentum": Hparam(0.9, unit_interval, "momentum coefficient mu"),
            "weight_decay": _WD,
            "foreach": _FOREACH,
            "fused": _FUSED,
        },
        build=_sgd(0.9, True),
        torch_class=torch.optim.SGD,
    )
)
register(
    OptimizerSpec(
        "rmsprop",
        "RMSProp: v <- a v + (1 - a) g^2; p <- p - lr g / (sqrt(v) + eps)",
        "Tieleman & Hinton 2012; torch.optim.RMSprop (eps outside the square root)",
        lr=1e-3,
        hparams={
            "alpha": Hparam(0.99, unit_interval, "decay of the squared-gradient average"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v) (torch's placement)"),
            "momentum": Hparam(0.0, unit_interval, "momentum on the scaled update"),
            "centered": Hparam(False, boolean, "divide by the variance estimate sqrt(v - m^2)"),
            "weight_decay": _WD,
            "foreach": _FOREACH,
            "form": _FORM,
        },
        build=_rmsprop,
        torch_class=torch.optim.RMSprop,
    )
)
_ADAM_HPARAMS = {
    "betas": Hparam((0.9, 0.999), betas(2), "decay of the first and second moment averages"),
    "eps": Hparam(1e-8, nonnegative, "added to sqrt(v_hat)"),
    "weight_decay": _WD,
    "amsgrad": Hparam(False, boolean, "use the running maximum of v (Reddi et al. 2018)"),
    "foreach": _FOREACH,
    "fused": _FUSED,
}
register(
    OptimizerSpec(
        "adam",
        "Adam: bias-corrected first and second moment averages; p <- p - lr m_hat / (sqrt(v_hat) + eps)",
        "Kingma & Ba 2015; torch.optim.Adam",
        lr=1e-3,
        hparams=_ADAM_HPARAMS | {"form": _FORM},
        build=_adam,
        torch_class=torch.optim.Adam,
    )
)
register(
    OptimizerSpec(
        "adamw",
        "AdamW: Adam with decoupled weight decay p <- p (1 - lr wd) before the Adam step",
        "Loshchilov & Hutter 2019; torch.optim.AdamW",
        lr=1e-3,
        hparams=_ADAM_HPARAMS | {"weight_decay": Hparam(0.01, nonnegative, "decoupled weight decay")},
        build=lambda groups, lr, **kw: torch.optim.AdamW(groups, lr=lr, **kw),
        torch_class=torch.optim.AdamW,
    )
)
register(
    OptimizerSpec(
        "nadam",
        "NAdam: Adam with Nesterov momentum (momentum_decay schedule); NAdamW with decoupled_weight_decay",
        "Dozat 2016; torch.optim.NAdam",
        lr=2e-3,
        hparams={
            "betas": Hparam((0.9, 0.999), betas(2), "decay of the first and second moment averages"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v_hat)"),
            "weight_decay": _WD,
            "momentum_decay": Hparam(4e-3, nonnegative, "psi in mu_t = beta1 (1 - 0.5 * 0.96^(t psi))"),
            "decoupled_weight_decay": Hparam(False, boolean, "true: NAdamW, p <- p (1 - lr wd)"),
            "foreach": _FOREACH,
            "form": _FORM,
        },
        build=_nadam,
        torch_class=torch.optim.NAdam,
    )
)
register(
    OptimizerSpec(
        "radam",
        "RAdam: Adam with the variance of the adaptive LR rectified (SGD with momentum while it is large)",
        "Liu et al. 2020; torch.optim.RAdam",
        lr=1e-3,
        hparams={
            "betas": Hparam((0.9, 0.999), betas(2), "decay of the first and second moment averages"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v_hat)"),
            "weight_decay": _WD,
            "decoupled_weight_decay": Hparam(False, boolean, "true: p <- p (1 - lr wd)"),
            "foreach": _FOREACH,
        },
        build=lambda groups, lr, **kw: torch.optim.RAdam(groups, lr=lr, **kw),
        torch_class=torch.optim.RAdam,
    )
)


def _adafactor_eps(value):
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and (value[0] is None or nonnegative(value[0]) is None)
        and nonnegative(value[1]) is None
    )
    return None if ok else "a list [eps1 or null, eps2], each >= 0"


register(
    OptimizerSpec(
        "adafactor",
        "Adafactor: factored second moments (row and column averages), relative step clipping by d",
        "Shazeer & Stern 2018; torch.optim.Adafactor (no first moment)",
        lr=1e-2,
        hparams={
            "beta2_decay": Hparam(-0.8, lambda v: None if isinstance(v, (int, float)) and v <= 0 else "a number <= 0",
                                  "beta2_t = 1 - t^beta2_decay"),
            "eps": Hparam((None, 1e-3), _adafactor_eps, "(eps1 added to g^2, eps2 lower bound of the RMS of p)"),
            "d": Hparam(1.0, positive, "clipping threshold of the update RMS"),
            "weight_decay": Hparam(0.0, nonnegative, "decoupled weight decay"),
            "foreach": _FOREACH,
        },
        build=lambda groups, lr, **kw: torch.optim.Adafactor(groups, lr=lr, **kw),
        torch_class=torch.optim.Adafactor,
    )
)
def _muon(groups, lr, **kw):
    if kw.get("batched") is False and kw.get("ns_dtype", "bfloat16") != "bfloat16":
        raise KeelError(f"optimizer.ns_dtype: {kw['ns_dtype']!r} needs the batched path (torch's Muon runs in "
                        "bfloat16); allowed with batched: false: bfloat16")
    return MuonWithAdamW(groups, lr=lr, **kw)


register(
    OptimizerSpec(
        "muon",
        "Muon (Newton-Schulz orthogonalised Nesterov momentum) on hidden 2-D weights, AdamW on embeddings, "
        "head, biases and norms",
        "Jordan et al. 2024; torch.optim.Muon + torch.optim.AdamW",
        lr=0.02,
        hparams={
            "weight_decay": Hparam(0.01, nonnegative, "Muon's decoupled weight decay"),
            "momentum": Hparam(0.95, unit_interval, "Muon momentum"),
            "nesterov": Hparam(True, boolean, "Nesterov momentum for Muon"),
            "ns_steps": Hparam(5, integer_in(1, MAX_NS_STEPS), "Newton-Schulz iterations"),
            "adjust_lr_fn": Hparam(
                None, one_of(None, "original", "match_rms_adamw"),
                "Muon LR shape scaling: original sqrt(max(1, rows/cols)); match_rms_adamw 0.2 sqrt(max(rows, cols))",
            ),
            "adam_lr": Hparam(3e-4, nonnegative, "LR of the AdamW groups (they follow the schedule in proportion)"),
            "adam_betas": Hparam((0.9, 0.95), betas(2), "AdamW betas"),
            "adam_eps": Hparam(1e-8, nonnegative, "AdamW eps"),
            "adam_weight_decay": Hparam(0.01, nonnegative, "AdamW decoupled weight decay"),
            "adam_fused": Hparam(None, optional(boolean), "AdamW's fused kernel (null: where torch has one)"),
            "adam_foreach": Hparam(
                None, optional(boolean), "AdamW's multi-tensor path (null: where the device has fast foreach kernels)"
            ),
            "batched": Hparam(
                None, optional(boolean), "Newton-Schulz batched over matrices of one shape (null: on CUDA; false: "
                "torch's Muon, one matrix at a time)",
            ),
            "ns_dtype": Hparam(
                "bfloat16", one_of(*NS_DTYPES), "dtype of the batched Newton-Schulz iterations (float32 needs "
                "batched true or null)",
            ),
        },
        build=_muon,
        group_split=muon_split,
        missing=muon_missing,
    )
)


# --- keel's own implementations ---

_FUSED_KEEL = Hparam(
    None,
    optional(boolean),
    "one compiled pass per tensor (null: when elements x run steps >= 5e10, i.e. 10M elements over 5000 steps, "
    "and a C++ compiler exists)",
)
_LENGTH = optional(length)
_UNITS = "steps, '100%' of the run, '2ep' or '1Mtok'"

register(
    OptimizerSpec(
        "lion",
        "Lion: p <- p (1 - lr wd) - lr sign(beta1 m + (1 - beta1) g); m <- beta2 m + (1 - beta2) g",
        "Chen et al. 2023; keel.optim.Lion",
        lr=1e-4,
        hparams={
            "betas": Hparam((0.9, 0.99), betas(2), "interpolation (beta1) and momentum (beta2) decays"),
            "weight_decay": Hparam(0.0, nonnegative, "decoupled weight decay (the paper uses 3-10x AdamW's)"),
            "fused": _FUSED_KEEL,
        },
        build=lambda groups, lr, **kw: Lion(groups, lr=lr, **kw),
        takes_total_steps=True,
    )
)
register(
    OptimizerSpec(
        "ademamix",
        "AdEMAMix: Adam whose numerator adds alpha times a slow gradient EMA (beta3), with alpha/beta3 warmups",
        "Pagliardini et al. 2024; keel.optim.AdEMAMix",
        lr=1e-3,
        hparams={
            "betas": Hparam((0.9, 0.999, 0.9999), betas(3), "fast EMA, second moment and slow EMA decays"),
            "alpha": Hparam(5.0, nonnegative, "weight of the slow EMA"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v_hat)"),
            "weight_decay": Hparam(0.0, nonnegative, "decoupled weight decay"),
            "alpha_warmup": Hparam(None, _LENGTH, f"linear warmup of alpha: {_UNITS} (null: none)", length=True),
            "beta3_warmup": Hparam(
                None, _LENGTH, f"half-life-linear warmup of beta3 from beta1: {_UNITS} (null: none)", length=True
            ),
            "t_alpha_beta3": Hparam(None, _LENGTH, "pytorch-optimizer's name: sets both warmups", length=True),
            "fused": _FUSED_KEEL,
        },
        build=lambda groups, lr, **kw: AdEMAMix(groups, lr=lr, **kw),
        takes_total_steps=True,
    )
)
register(
    OptimizerSpec(
        "soap",
        "SOAP: Adam in the eigenbasis of Shampoo's preconditioner, refreshed every precondition_frequency steps",
        "Vyas et al. 2024; keel.optim.SOAP",
        lr=3e-3,
        hparams={
            "betas": Hparam((0.95, 0.95), betas(2), "Adam's decays in the rotated basis"),
            "shampoo_beta": Hparam(None, optional(unit_interval), "decay of Shampoo's statistics (null: beta2)"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v)"),
            "weight_decay": Hparam(0.01, nonnegative, "decoupled weight decay, applied after the update"),
            "precondition_frequency": Hparam(10, positive_int, "steps between eigenbasis refreshes"),
            "max_precondition_dim": Hparam(10000, positive_int, "larger dimensions are not rotated"),
            "merge_dims": Hparam(False, boolean, "merge consecutive dims while their product <= max_precondition_dim"),
            "precondition_1d": Hparam(False, boolean, "rotate 1-D parameters too"),
            "correct_bias": Hparam(True, boolean, "Adam's bias correction"),
            "batched": Hparam(None, optional(boolean), "same-shape 2-D parameters stepped as stacks, batched products "
                              "(null: on CUDA)"),
            "matmul_precision": Hparam(None, optional(one_of(*MATMUL_PRECISIONS)),
                                       "precision of the products: highest, tf32 or bfloat16 (null: tf32 on CUDA, "
                                       "highest elsewhere)"),
        },
        build=lambda groups, lr, **kw: SOAP(groups, lr=lr, **kw),
    )
)


# --- hypergradient descent (Baydin et al. 2018): the LR learns online; keel.optim.hypergradient ---

register(
    OptimizerSpec(
        "sgd_hd",
        "SGD-HD: alpha <- alpha + beta g_t . u_{t-1}; p <- p - alpha u_t (u: the SGD direction); the schedule "
        "shapes alpha",
        "Baydin et al. 2018, Algorithm 1 (SGDN-HD with nesterov); keel.optim.SGDHD",
        lr=0.1,
        hparams={
            "hypergradient_lr": Hparam(1e-3, nonnegative, "beta, the LR of the learning rate (the paper's 1e-3)"),
            "momentum": Hparam(0.0, unit_interval, "momentum coefficient mu (0: plain SGD-HD)"),
            "nesterov": Hparam(False, boolean, "Nesterov momentum (the paper's SGDN-HD)"),
            "weight_decay": _WD,
        },
        build=lambda groups, lr, **kw: SGDHD(groups, lr=lr, **kw),
    )
)
register(
    OptimizerSpec(
        "adam_hd",
        "Adam-HD: alpha <- alpha + beta g_t . u_{t-1}; p <- p - alpha u_t (u: m_hat / (sqrt(v_hat) + eps)); the "
        "schedule shapes alpha",
        "Baydin et al. 2018, Algorithm 3; keel.optim.AdamHD",
        lr=1e-3,
        hparams={
            "hypergradient_lr": Hparam(1e-7, nonnegative, "beta, the LR of the learning rate (the paper's 1e-7)"),
            "betas": Hparam((0.9, 0.999), betas(2), "decay of the first and second moment averages"),
            "eps": Hparam(1e-8, nonnegative, "added to sqrt(v_hat)"),
            "weight_decay": Hparam(0.0, nonnegative, "decoupled weight decay (AdamW's), part of the direction u"),
        },
        build=lambda groups, lr, **kw: AdamHD(groups, lr=lr, **kw),
    )
)
