"""Fine-tuning the exported MM v2 model as any Hugging Face causal LM: padded batches (right and
left) give each row's own logits and losses, ``num_items_in_batch`` makes accumulated
half-batches equal one batch, the ``Trainer`` runs with gradient accumulation and checkpointing,
hidden states, no cache in training mode, PEFT LoRA with the declared default targets, and the
Table 6 initialisation of a model built from its config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_fixtures import hf_model, perturbed_reference, tiny_tokenizer
from mm_testing import tiny_config

from mm_megatron.convert.hf_export import export_hf
from mm_megatron.convert.mm_layout import reference_to_hf
from mm_megatron.hf.configuration_memory_mosaics import MemoryMosaicsConfig
from mm_megatron.hf.modeling_memory_mosaics import (
    CACHE_KWARG,
    LORA_TARGET_MODULES,
    TABLE6_SCALARS,
    MemoryMosaicsCache,
    MemoryMosaicsForCausalLM,
    MemoryMosaicsMemory,
)

pytestmark = pytest.mark.hf

PAD = 1  # <|end_of_text|> of the tiny tokenizer, used as its pad token; data uses ids 2..63


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config(seq_length=128)
    ref = perturbed_reference(cfg, seed=11)
    return cfg, ref, hf_model(cfg, ref.state_dict())


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """An exported model directory and the path of its tokenizer file."""
    cfg, ref, _ = models
    root = tmp_path_factory.mktemp("finetune")
    tok = tiny_tokenizer(root / "tok")
    export_hf(ref.state_dict(), cfg, root / "model", [tok])
    return root / "model", tok


def _load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)


def _rows(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (n,), generator=g) for n in lengths]


def _pad(rows: list[torch.Tensor], side: str, pad_id: int | torch.Tensor = PAD):
    """Rows padded to the longest on ``side``; returns ids, attention mask and labels (-100 at
    pads). ``pad_id`` may be a tensor of per-position ids."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl], mask[i, sl] = r, 1
    pads = torch.as_tensor(pad_id).expand_as(ids)
    ids = torch.where(mask.bool(), ids, pads)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _real(out: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
    return out[i, mask[i].bool()]


# 1. padded batches ------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_rows(models, side):
    """Each row of a padded batch (rows crossing the 64-token scan chunk, longer than h and m,
    and shorter than m) gets the logits of that row run alone, up to fp32 rounding (this
    perturbed model's fp32 logits differ from its fp64 ones by up to ~2e-4, and a padded row
    rounds differently from the row alone; test_padded_batch_fp64_exact checks the same
    rows to 1e-10 in fp64); pad ids and pad embeddings change nothing at real positions."""
    _, _, hf = models
    rows = _rows([70, 41, 66, 2, 9], seed=1)
    ids, mask, _ = _pad(rows, side)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, use_cache=False).logits
        alone = [hf(r[None], use_cache=False).logits[0] for r in rows]
        for i, want in enumerate(alone):
            torch.testing.assert_close(_real(out, mask, i), want, rtol=1e-5, atol=3e-4)
        other_ids = torch.randint(0, 64, ids.shape, generator=torch.Generator().manual_seed(2))
        out2 = hf(_pad(rows, side, other_ids)[0], attention_mask=mask, use_cache=False).logits
        emb = hf.get_input_embeddings()(ids)
        noise = 1e3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
        emb = torch.where(mask.bool().unsqueeze(-1), emb, noise)
        out3 = hf(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert torch.equal(out2[real], out[real])
    assert torch.equal(out3[real], out[real])
    assert (out2[~real] - out[~real]).abs().max() > 1e-2  # the pads themselves did change
    if side == "left":  # without the mask the rows are not read as documents of their own
        with torch.no_grad():
            unmasked = hf(ids, use_cache=False).logits
        assert (unmasked[real] - out[real]).abs().max() > 1e-1


def test_padded_batch_fp64_exact(models):
    """In fp64, right- and left-padded batches match the single rows to 1e-10."""
    _, _, hf32 = models
    hf = copy.deepcopy(hf32).double()
    rows = _rows([30, 12, 5], seed=4)
    with torch.no_grad():
        alone = [hf(r[None], use_cache=False).logits[0] for r in rows]
        for side in ("right", "left"):
            ids, mask, _ = _pad(rows, side)
            out = hf(ids, attention_mask=mask, use_cache=False).logits
            for i, want in enumerate(alone):
                torch.testing.assert_close(_real(out, mask, i), want, rtol=0, atol=1e-10)


def test_bad_padding_raises(models):
    """Real tokens must be contiguous; a right-padded prompt cannot continue with a cache."""
    _, _, hf = models
    ids, mask, _ = _pad(_rows([10, 6], seed=5), "right")
    holes = mask.clone()
    holes[0, 3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous"):
        hf(ids, attention_mask=holes, use_cache=False)
    with torch.no_grad(), pytest.raises(ValueError, match="right padding"):
        hf(ids, attention_mask=mask, use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="right padding"):
        hf(ids, attention_mask=mask, **{CACHE_KWARG: MemoryMosaicsCache(hf.config)})
    both = torch.zeros_like(mask)  # padding on both sides is still one contiguous document
    both[:, 2:8] = 1
    with torch.no_grad():
        out = hf(ids, attention_mask=both, use_cache=False).logits
        torch.testing.assert_close(
            out[0, 2:8], hf(ids[:1, 2:8], use_cache=False).logits[0], rtol=1e-5, atol=2e-5
        )


# 2. loss ----------------------------------------------------------------------------------


def _row_loss_sums(hf, rows: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Σ over rows of the summed next-token cross-entropy of each row alone, and the count."""
    total, count = torch.zeros(()), 0
    for r in rows:
        logits = hf(r[None], use_cache=False).logits[0]
        total = total + F.cross_entropy(logits[:-1], r[1:], reduction="sum")
        count += len(r) - 1
    return total, count


def test_padded_loss_equals_unpadded_rows(models):
    """labels with -100 at the pads: the loss is the mean over all labelled tokens of the
    batch, the same as summing each unpadded row's token losses (not a mean of row means),
    whatever the pad ids; with left padding no prediction is made from a pad."""
    _, _, hf = models
    rows = _rows([20, 7, 13], seed=6)
    other_ids = torch.randint(2, 64, (3, 20), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        total, count = _row_loss_sums(hf, rows)
        row_means = [(_row_loss_sums(hf, [r])[0] / (len(r) - 1)) for r in rows]
        for side in ("right", "left"):
            for pad_id in (PAD, other_ids):
                ids, mask, labels = _pad(rows, side, pad_id)
                loss = hf(ids, attention_mask=mask, labels=labels, use_cache=False).loss
                torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)
    assert abs(float(sum(row_means) / len(rows)) - float(total / count)) > 1e-2


def test_num_items_in_batch_accumulation(models):
    """Two half-batches with ``num_items_in_batch`` = all labelled tokens: loss(sum)/N, so the
    half losses add up to the full batch's loss and their gradients to its gradients. The
    model runs in fp64 (its RMSNorm, per-head scalars and loss stay fp32, as in training) so
    that the summation order of fp32 matmuls stays well inside the tolerances."""
    _, _, hf32 = models
    hf = copy.deepcopy(hf32).double().train()
    rows = _rows([18, 5, 11, 14], seed=7)
    ids, mask, labels = _pad(rows, "right")
    n_items = int((labels[:, 1:] != -100).sum())
    assert n_items == sum(len(r) - 1 for r in rows)

    hf.zero_grad()
    full = hf(ids, attention_mask=mask, labels=labels).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in hf.named_parameters()}

    hf.zero_grad()
    halves = []
    for part, n in ((slice(0, 2), n_items), (slice(2, 4), torch.tensor(n_items))):
        sub = _pad(rows[part], "right")  # each half padded to its own length
        loss = hf(sub[0], attention_mask=sub[1], labels=sub[2], num_items_in_batch=n).loss
        loss.backward()
        halves.append(loss.detach())
    torch.testing.assert_close(halves[0] + halves[1], full.detach(), rtol=1e-5, atol=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(
            hf.get_parameter(name).grad,
            g,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    with torch.no_grad():  # without it each half is a mean of its own: the sum is ~2x the loss
        plain = sum(
            hf(*_pad(rows[p], "right")[:2], labels=_pad(rows[p], "right")[2]).loss
            for p in (slice(0, 2), slice(2, 4))
        )
    assert float(plain) > 1.5 * float(full)


# 3. Trainer, gradient checkpointing --------------------------------------------------------


def _block_call_counter(model) -> tuple[list[int], object]:
    """Counts the calls of block 0 (a pre-hook: a checkpointed recomputation may stop before
    the block's end, once it has rebuilt what the backward pass needs)."""
    calls = [0]

    def hook(*_args: object) -> None:
        calls[0] += 1

    return calls, model.model.blocks[0].register_forward_pre_hook(hook)


def test_trainer_accumulation_and_checkpointing(exported, models, tmp_path):
    """``Trainer`` with gradient accumulation and gradient checkpointing on the exported model:
    runs, the logged loss of step 1 is the loss of its two micro-batches over all their
    labelled tokens (not scaled by the accumulation steps), and checkpointing recomputes the
    blocks in the backward pass."""
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    directory, tok_file = exported
    _, ref, _ = models
    model = _load(directory)
    want_state = reference_to_hf(ref.state_dict())
    for name, tensor in model.state_dict().items():  # loading does not re-initialise anything
        assert torch.equal(tensor, want_state[name]), name
    initial = copy.deepcopy(model).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), pad_token="<|end_of_text|>")
    assert tokenizer.pad_token_id == PAD and tokenizer.padding_side == "right"
    data = [{"input_ids": r.tolist()} for r in _rows([9, 17, 4, 12, 7, 15, 6, 11], seed=8)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    seen: list[dict] = []
    top = model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append({k: v for k, v in kw.items() if v is not None}),
        with_kwargs=True,
    )
    calls, block = _block_call_counter(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:4], data_collator=collator
    )
    trainer.train()
    top.remove()
    block.remove()
    assert math.isfinite(trainer.evaluate()["eval_loss"])

    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    on = model.is_gradient_checkpointing if on is None else on  # 4.x
    assert on and model.model.gradient_checkpointing
    assert len(seen) == 6  # 3 steps x 2 micro-batches
    assert calls[0] == 2 * len(seen)  # each block forward is recomputed in the backward pass
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    first = seen[:2]
    for batch in first:  # right padding by the collator, labels -100 at the pads
        mask = batch["attention_mask"]
        assert (mask[:, :-1] >= mask[:, 1:]).all() and not mask.all()
        assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(mask == 0, -100))
    # The Trainer counts the labelled tokens of the accumulated batches: shifted (the targets)
    # since transformers 5, unshifted (one more per row) in 4.x. The model divides by its count.
    n_items = int(first[0]["num_items_in_batch"])
    shifted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in first)
    unshifted = sum(int((b["labels"] != -100).sum()) for b in first)
    assert n_items in (shifted, unshifted)
    assert all(int(b["num_items_in_batch"]) == n_items for b in first)
    total = torch.zeros(())
    with torch.no_grad():
        for b in first:
            for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True):
                row = ids[m.bool()]
                logits = initial(row[None], use_cache=False).logits[0]
                total = total + F.cross_entropy(logits[:-1], row[1:], reduction="sum")
    direct = float(total) / n_items
    assert losses[0] == pytest.approx(direct, rel=1e-5)


def test_gradient_checkpointing_same_gradients(models):
    """One right-padded batch: gradients with ``gradient_checkpointing_enable()`` (default
    non-reentrant, and reentrant) equal those without, and the blocks really run twice."""
    _, _, hf32 = models
    hf = copy.deepcopy(hf32).train()
    ids, mask, labels = _pad(_rows([21, 9, 15], seed=9), "right")
    grads, counts = [], []
    for kwargs in (False, None, {"use_reentrant": True}):
        if kwargs is not False:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert hf.model.gradient_checkpointing
        calls, handle = _block_call_counter(hf)
        hf.zero_grad()
        hf(ids, attention_mask=mask, labels=labels).loss.backward()
        handle.remove()
        counts.append(calls[0])
        grads.append({n: p.grad.clone() for n, p in hf.named_parameters()})
    assert counts == [1, 2, 2]
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        for other in grads[1:]:
            torch.testing.assert_close(
                other[name], g, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}"
            )


# 4.-5. hidden states, cache -----------------------------------------------------------------


def test_output_hidden_states(models):
    """num_layers + 1 states: the embeddings, each block's output, and last the final-normed
    state that the classifier reads."""
    cfg, _, hf = models
    ids = torch.cat(_rows([2 * 12], seed=10)).view(2, 12)
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, o: captured.append(o)) for b in hf.model.blocks]
    hooks.append(hf.model.final_norm.register_forward_hook(lambda m, a, o: captured.append(o)))
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, use_cache=False)
    for h in hooks:
        h.remove()
    hidden = out.hidden_states
    assert isinstance(hidden, tuple) and len(hidden) == cfg.num_layers + 1
    assert torch.equal(hidden[0], hf.get_input_embeddings()(ids))
    for i in range(1, cfg.num_layers):
        assert torch.equal(hidden[i], captured[i - 1])
    assert torch.equal(hidden[-1], captured[-1])  # after the final norm, not the last block
    assert not torch.equal(hidden[-1], captured[cfg.num_layers - 1])
    assert torch.equal(hf.lm_head(hidden[-1]), out.logits)
    with torch.no_grad():
        assert hf(ids, use_cache=False).hidden_states is None


def test_no_cache_in_training_mode(models):
    _, _, hf32 = models
    hf = copy.deepcopy(hf32)
    ids = torch.cat(_rows([10], seed=11))[None]
    hf.train()
    assert getattr(hf(ids), CACHE_KWARG) is None
    assert isinstance(getattr(hf(ids, use_cache=True), CACHE_KWARG), MemoryMosaicsCache)
    hf.eval()
    with torch.no_grad():
        cache = getattr(hf(ids), CACHE_KWARG)
    assert isinstance(cache, MemoryMosaicsCache) and cache.get_seq_length() == 10


# 6. PEFT ----------------------------------------------------------------------------------


def test_lora_default_targets_train_step_and_merge(exported):
    """LoRA without target_modules on the exported model: exactly the declared targets get
    adapters; a training step changes adapter weights only; merge_and_unload keeps the
    logits."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    directory, _ = exported
    model = _load(directory)
    ids, mask, labels = _pad(_rows([16, 10], seed=12), "right")
    with torch.no_grad():
        base_logits = model.eval()(ids, attention_mask=mask, use_cache=False).logits
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    assert set(pm.peft_config["default"].target_modules) == set(LORA_TARGET_MODULES)
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, LoraLayer)]
    cfg = model.config
    per_layer = 2 * len(cfg.memory_kinds) + 4  # W_phi, W_psi per memory; W_o, W1, W2, W3
    assert len(wrapped) == cfg.num_hidden_layers * per_layer
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(LORA_TARGET_MODULES)

    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.5)
    pm.train()
    for _ in range(2):  # lora_B starts at 0: the second step moves lora_A too
        opt.zero_grad()
        pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)

    pm.eval()
    with torch.no_grad():
        adapted = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        merged = pm.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in merged.modules())
        got = merged(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-4)


# 7. initialisation -------------------------------------------------------------------------

INIT_SIZES = dict(
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=4,
    num_heads=16,
    intermediate_size=512,
    short_window=8,
    stm_max_lag=7,
    ltm_offset=3,
)
TRUNC_STD = 0.98664  # std of N(0, 1) truncated to [-3, 3]


def _check_table6(model, cfg) -> None:
    d, f = cfg.hidden_size, cfg.intermediate_size
    groups: dict[str, tuple[list[torch.Tensor], float]] = {
        "embedding": ([model.model.embedding.weight], 1 / math.sqrt(2 * d)),
        "lm_head": ([model.lm_head.weight], 1 / math.sqrt(2 * d)),
    }
    for layer in (0, cfg.num_hidden_layers - 1):
        block = model.model.blocks[layer]
        sigma = 1 / math.sqrt(2 * d * (layer + 1))
        for name in ("W_phi", "W_psi", "W_g", "W_lam"):  # pooled over the two memories
            mats = [getattr(m, name).weight for m in block.memories.values()]
            groups[f"{layer}.{name}"] = (mats, sigma)
        for name in ("W_o", "W1", "W3"):
            groups[f"{layer}.{name}"] = ([getattr(block, name).weight], sigma)
        groups[f"{layer}.W2"] = ([block.W2.weight], 1 / math.sqrt(2 * f * (layer + 1)))
    for name, (mats, sigma) in groups.items():
        w = torch.cat([m.detach().flatten() for m in mats]).double()
        assert w.numel() >= 8000, name
        assert abs(float(w.mean())) < 0.05 * sigma, name
        assert float(w.std()) == pytest.approx(TRUNC_STD * sigma, rel=0.04), name
        assert float(w.abs().max()) <= 3 * sigma * (1 + 1e-6), name
        assert float(w.abs().max()) > 2.5 * sigma, name  # a normal, not a uniform or a constant
    gammas = []
    for block in model.model.blocks:
        for norm in (block.norm1, block.norm2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        for mem in block.memories.values():
            for name, value in TABLE6_SCALARS.items():
                p = getattr(mem, name)
                assert torch.equal(p, torch.full_like(p, value)), name
            gammas.append(mem.gamma.detach())
    gamma = torch.cat(gammas)
    assert float(gamma.min()) >= 0 and float(gamma.max()) <= 1
    assert float(gamma.std()) > 0.15 and not (gamma == 0.5).any()
    assert torch.equal(model.model.final_norm.weight, torch.ones(cfg.hidden_size))


def test_init_weights_table6(exported):
    """A model built from its config alone, through the remote code and through the class,
    follows Table 6; ``__init__`` and ``_init_weights`` give the same distributions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, _ = exported
    cfg = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    cfg.update(INIT_SIZES)
    torch.manual_seed(0)
    remote = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    assert type(remote).__name__ == "MemoryMosaicsForCausalLM"
    _check_table6(remote, cfg)

    local_cfg = MemoryMosaicsConfig(**INIT_SIZES)
    torch.manual_seed(1)
    model = MemoryMosaicsForCausalLM(local_cfg)
    _check_table6(model, local_cfg)
    with torch.no_grad():  # spoil everything, then re-initialise every module
        for p in model.parameters():
            p.fill_(0.5)
    for module in model.modules():
        model._init_weights(module)
    _check_table6(model, local_cfg)

    torch.manual_seed(2)  # the memory's own __init__ (no post_init) sets the Table 6 scalars
    mem = MemoryMosaicsMemory(local_cfg, "long", 2)
    for name, value in TABLE6_SCALARS.items():
        assert torch.equal(getattr(mem, name), torch.full((16,), float(value))), name
    assert float(mem.gamma.std()) > 0.1 and not (mem.gamma == 0.5).any()
    assert mem.W_phi.table6_std == pytest.approx(1 / math.sqrt(2 * 256 * 3))


def test_evaluation_of_right_padded_batches_builds_no_cache():
    """The Trainer's evaluation (eval mode, labels, right padding) on any transformers version:
    the loss is computed and no cache is built, since decoding cannot continue from it."""
    cfg = tiny_config(seq_length=64)
    model = hf_model(cfg, perturbed_reference(cfg, seed=3).state_dict()).eval()
    ids = torch.randint(2, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        assert torch.isfinite(out.loss) and getattr(out, CACHE_KWARG) is None
        assert getattr(model(ids, attention_mask=mask), CACHE_KWARG) is None
        assert getattr(model(ids), CACHE_KWARG) is not None  # unpadded inference keeps one
        with pytest.raises(ValueError, match="right padding cannot be continued"):
            model(ids, attention_mask=mask, use_cache=True)
