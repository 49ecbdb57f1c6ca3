"""The one training loop, used by hospital nodes (one federated round) and the pooled baseline.

Takes PreparedCases or Batches (no Flower types). Progressive modality alignment (stage 1: each
encoder with its own auxiliary head; stage 2: everything, fused), loss-ratio modality weighting
(losses.LossRatioWeighting), modality dropout, EHR field dropout, MoE auxiliary losses, optional
FedProx term.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from multimodal.config import TrainConfig
from multimodal.data import Batch, PreparedCase, collate, concat_batches
from multimodal.dp import DPSpend
from multimodal.losses import LossRatioWeighting, fedprox_term, masked_bce
from multimodal.model import FedsightModel
from vocab.errors import ConfigError
from vocab.modalities import MODALITIES

Data = Sequence[PreparedCase] | Batch | Sequence[Batch]


@dataclass
class TrainResult:
    """What a training run reports (aggregates only; safe to send off-site)."""

    n_examples: int
    steps: int
    global_step: int  # start_step + steps: pass as start_step next round (noise anneal)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    expert_counts: torch.Tensor | None = None  # (n_blocks, n_experts) tokens routed this run
    expert_counts_by_group: torch.Tensor | None = None  # (n_blocks, groups, n_experts)
    dp: DPSpend | None = None  # set when trained with DP-SGD (cfg.dp)


def as_batch(model: FedsightModel, data: Data) -> Batch:
    """One Batch holding every case (collated on the model's input grid)."""
    if isinstance(data, Batch):
        return data
    data = list(data)
    if data and all(isinstance(b, Batch) for b in data):
        return concat_batches(data)  # type: ignore[arg-type]
    inp = model.cfg.inputs
    return collate(data, model.schema, inp.ct_shape, inp.path_size)  # type: ignore[arg-type]


def modality_dropout(batch: Batch, p: float, modalities: Sequence[str],
                     gen: torch.Generator) -> Batch:
    """Hide each present modality (among `modalities`) with probability p; never hide all of a
    case's modalities (one random originally-present one is kept)."""
    if p <= 0:
        return batch
    in_model = torch.tensor([m in modalities for m in MODALITIES])
    pres = batch.present() & in_model  # (B, 3)
    keep = pres & (torch.rand(pres.shape, generator=gen) >= p)
    emptied = ~keep.any(1) & pres.any(1)  # (B,)
    pick = torch.rand(pres.shape, generator=gen).masked_fill(~pres, -1.0).argmax(1)  # (B,)
    keep[emptied, pick[emptied]] = True
    return batch.with_present(keep | (batch.present() & ~in_model))


def augment(batch: Batch, gen: torch.Generator) -> Batch:
    """Random per-case flips: CT left-right (W axis); pathology tiles along H and along W."""
    b = len(batch)
    d = dict(batch.__dict__)
    f = torch.rand(3, b, generator=gen) < 0.5  # (3, B)
    d["ct"] = torch.where(f[0].view(b, 1, 1, 1, 1), batch.ct.flip(-1), batch.ct)
    path = torch.where(f[1].view(b, 1, 1, 1), batch.path.flip(-1), batch.path)
    d["path"] = torch.where(f[2].view(b, 1, 1, 1), path.flip(-2), path)
    return Batch(**d)


def ehr_field_dropout(batch: Batch, p: float, gen: torch.Generator) -> Batch:
    """Mark each recorded EHR field missing with probability p (the model's learned per-field
    missing embedding stands in), so that no single field can be memorised."""
    if p <= 0:
        return batch
    d = dict(batch.__dict__)
    d["ehr_observed"] = batch.ehr_observed & (torch.rand(batch.ehr_observed.shape,
                                                         generator=gen) >= p)
    return Batch(**d)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    prev, prev_warn = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def train_local(
    model: FedsightModel,
    data: Data,
    cfg: TrainConfig,
    *,
    global_state: dict[str, torch.Tensor] | None = None,
    stage: int | None = None,
    start_step: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `data` for cfg.epochs epochs; returns a TrainResult.

    stage: None follows cfg.stage1_epochs (epochs < stage1_epochs are stage 1); 1 or 2 forces it
    (a federated round chooses the stage by round number). global_state: the round's global
    weights for the FedProx term (used when cfg.fedprox_mu > 0). start_step: global optimiser step
    at the start (router noise anneals over ModelConfig.router_noise_steps steps).
    """
    if stage not in (None, 1, 2):
        raise ValueError(f"stage must be None, 1 or 2, got {stage!r}")
    t0 = time.perf_counter()
    full = as_batch(model, data)
    labelled = torch.isfinite(full.label).nonzero().squeeze(1)
    full = full.select(labelled)
    n = len(full)
    mods = model.cfg.modalities
    torch.manual_seed(cfg.seed)  # router noise, dropout
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling, modality dropout
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    # Under DP the weights stay equal: loss-ratio weights are computed from the training
    # losses, a release of the data that does not pass through the DP mechanism.
    weighting = LossRatioWeighting(mods, cfg.loss_ratio_alpha,
                                   cfg.loss_weighting == "loss_ratio" and not cfg.dp)
    prox = {k: v.detach().clone() for k, v in (global_state or {}).items()}
    fused_model = model.cfg.fusion == "moe"
    model.reset_expert_counts()
    model.train()
    step = 0
    history: list[dict[str, float]] = []
    dp = None
    if cfg.dp:
        if model.cfg.path_norm == "batch":  # batch statistics mix cases: no per-case gradient
            raise ConfigError("DP-SGD needs path_norm 'group' (BatchNorm makes one case's "
                              "gradient depend on the others in its batch)")
        from multimodal import dp as dpmod

        secret = dpmod.secure_generator()  # batch sampling and noise: never from cfg.seed
        spend = dpmod.plan(n, cfg.batch_size, cfg.epochs, cfg.dp_noise_multiplier)
        dp_steps: dict[int, dpmod.DPStep] = {}

        def dp_for(st: int) -> dpmod.DPStep:
            """One DP optimiser per stage, over the parameters that stage trains: noise added
            to a parameter no loss reaches would only move it at random (Adam scales it up)."""
            if st not in dp_steps:
                params = _stage_params(model, full, st, cfg)
                opt_st = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                dp_steps[st] = dpmod.DPStep(opt_st, cfg.dp_noise_multiplier,
                                            cfg.dp_max_grad_norm, cfg.batch_size, secret)
            return dp_steps[st]
        dp = dp_for
    with _deterministic():
        for epoch in range(cfg.epochs if n else 0):
            st = stage or (1 if epoch < cfg.stage1_epochs else 2)
            w = weighting.weights()
            sums: dict[str, float] = {"loss": 0.0, "main": 0.0, "moe": 0.0}
            aux_sum = {m: 0.0 for m in mods}
            aux_n = {m: 0 for m in mods}
            n_batches = 0
            if dp is None:
                batches = list(torch.randperm(n, generator=gen).split(cfg.batch_size))
            else:  # Poisson sampling, as many steps as a shuffled epoch has batches
                batches = [dpmod.poisson_batch(n, spend.sample_rate, secret)
                           for _ in range(math.ceil(n / cfg.batch_size))]
            for idx in batches:
                b = full.select(idx)
                if cfg.augment:
                    b = augment(b, gen)
                b = ehr_field_dropout(b, cfg.ehr_field_dropout, gen)
                if st == 2:
                    b = modality_dropout(b, cfg.modality_dropout, mods, gen)
                if fused_model:
                    noise = max(0.0, 1.0 - (start_step + step) / max(model.cfg.router_noise_steps,
                                                                      1))
                    model.set_router_noise_scale(noise)
                if dp is None:
                    loss, parts = _loss(model, b, st, w, cfg)
                    if cfg.fedprox_mu > 0 and prox:
                        loss = loss + fedprox_term(model, prox, cfg.fedprox_mu)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                else:
                    dp_st = dp(st)
                    per_case = [_loss(model, b.select(torch.tensor([i])), st, w, cfg)
                                for i in range(len(b))]
                    grads = dpmod.per_sample_grads(dp_st.params, len(b),
                                                   lambda i, pc=per_case: pc[i][0])
                    dp_st.step(grads, (lambda: _add_prox_grad(model, prox, cfg.fedprox_mu))
                            if cfg.fedprox_mu > 0 and prox else None)
                    loss, parts = _mean_parts(per_case, b, mods)
                step += 1
                n_batches += 1
                sums["loss"] += float(loss.detach())
                sums["main"] += float(parts["main"])
                sums["moe"] += float(parts["moe"])
                present = dict(zip(MODALITIES, b.present().unbind(1), strict=True))
                for m in mods:
                    k = int(present[m].sum())
                    aux_sum[m] += float(parts[f"aux_{m}"]) * k
                    aux_n[m] += k
            epoch_aux = {m: aux_sum[m] / aux_n[m] if aux_n[m] else math.nan for m in mods}
            weighting.update(epoch_aux)
            rec = {"epoch": float(epoch), "stage": float(st),
                   **{k: v / max(n_batches, 1) for k, v in sums.items()},
                   **{f"aux_{m}": v for m, v in epoch_aux.items()},
                   **{f"weight_{m}": v for m, v in w.items()}}
            history.append(rec)
            if log is not None:
                log(rec)
    model.set_router_noise_scale(0.0)
    model.eval()
    return TrainResult(
        n_examples=n, steps=step, global_step=start_step + step,
        seconds=time.perf_counter() - t0, history=history,
        expert_counts=model.expert_counts(), expert_counts_by_group=model.expert_counts(True),
        dp=DPSpend(spend.noise_multiplier, spend.sample_rate, step) if dp else None,
    )


def _loss(model: FedsightModel, b: Batch, st: int, w: dict[str, float], cfg: TrainConfig
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of batch b in stage st (1: each modality's own head, weighted by w;
    2: fused head + aux_weight * the modality heads + MoE losses) and its parts."""
    mods = model.cfg.modalities
    out = model(b, fuse=st == 2)
    present = dict(zip(MODALITIES, b.present().unbind(1), strict=True))
    aux = {m: masked_bce(out.aux_logits[m], b.label, present[m]) for m in mods}
    loss = sum(w[m] * aux[m] for m in mods)
    zero = torch.zeros(())
    parts = {f"aux_{m}": aux[m].detach() for m in mods} | {"main": zero, "moe": zero}
    if st == 2:
        main = masked_bce(out.logit, b.label, torch.ones_like(b.label, dtype=bool))
        loss = main + cfg.aux_weight * loss + out.moe_loss
        parts |= {"main": main.detach(), "moe": out.moe_loss.detach()}
    return loss, parts


def _stage_params(model: FedsightModel, full: Batch, st: int, cfg: TrainConfig
                  ) -> list[torch.nn.Parameter]:
    """Trainable parameters stage st can reach: all of them in stage 2 (which experts a case
    reaches depends on its data, so every one gets noise); in stage 1 those the per-modality
    heads reach, found by a probe pass on one case with every modality present and then absent
    (structural: which parameters a graph contains does not depend on input values)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if st == 2 or len(full) == 0:
        return params
    one = full.select(torch.tensor([0]))
    reached: set[int] = set()
    w = {m: 1.0 for m in model.cfg.modalities}
    for present in (True, False):
        probe = one.with_present(torch.full_like(one.present(), present))
        grads = torch.autograd.grad(_loss(model, probe, st, w, cfg)[0], params,
                                    allow_unused=True)
        reached |= {i for i, g in enumerate(grads) if g is not None}
    return [p for i, p in enumerate(params) if i in reached]


def _mean_parts(per_case: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], b: Batch,
                mods: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean loss and parts of per-case results, as the batched pass reports them (a
    modality's aux part: mean over the cases that have it). Logged locally only."""
    zero = torch.zeros(())
    if not per_case:
        return zero, {f"aux_{m}": zero for m in mods} | {"main": zero, "moe": zero}
    present = dict(zip(MODALITIES, b.present().sum(0).tolist(), strict=True))
    loss = torch.stack([lo.detach() for lo, _ in per_case]).mean()
    parts = {k: torch.stack([p[k] for _, p in per_case]).sum() for k in per_case[0][1]}
    for k in parts:
        m = k.removeprefix("aux_")
        parts[k] = parts[k] / max(present[m] if k.startswith("aux_") else len(per_case), 1)
    return loss, parts


def _add_prox_grad(model: FedsightModel, prox: dict[str, torch.Tensor], mu: float) -> None:
    """FedProx's gradient mu * (w - w_global), added after the DP noise (it reads no data)."""
    for name, p in model.named_parameters():
        if p.requires_grad and name in prox and p.grad is not None:
            p.grad.add_(p.detach() - prox[name].to(p.dtype), alpha=mu)
