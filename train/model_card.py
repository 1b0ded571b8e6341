"""The model card: model/README.md in the Hugging Face format (YAML metadata, then markdown sections).

`model_card` is a pure function of plain dicts (configs, step 2's manifest, the eval history, ...), so it can
be tested without training; `train.final_model.save_model` writes its result beside the weights.
Every section says "not recorded" for what it was not given, instead of guessing.
"""

from __future__ import annotations

import math

import yaml

NOT_RECORDED = "not recorded"
EXAMPLE_SENTENCE = "the {mask} was very good ."


def model_card(card: dict) -> str:
    """card keys (all optional but `architecture`): architecture (the model's config.json as a dict), tag,
    dataset, train (configs), data (step 2's manifest), eval_history, n_parameters, total_steps, device,
    n_processes, mixed_precision, valid_expert_counts ([n_moe_layers][n_experts] tokens at the last eval),
    mask_token."""
    sections = [
        _metadata(card),
        f"# {_title(card)}\n\n"
        f"A {_attention(card['architecture'])} Transformer encoder whose feed-forward blocks are sparse "
        "Mixture-of-Experts layers, pretrained with masked language modelling by this project's step 3 "
        "(`train/train.py`). The modeling code is in this folder (`encoder.py` and the files it imports), so it "
        "loads without the project with `trust_remote_code=True`.",
        _architecture(card),
        _training_data(card),
        _training(card),
        _evaluation(card),
        _routing(card),
        _how_to_load(card),
    ]
    return "\n\n".join(sections) + "\n"


def _title(card: dict) -> str:
    return f"MoE encoder, run `{card['tag']}`" if card.get("tag") else "MoE encoder"


def moe_layer_indices(architecture: dict) -> list[int]:
    """Same rule as MoEEncoderConfig.is_moe_block: block i is MoE when (i + 1) % moe_every == 0."""
    every = architecture.get("moe_every", 1)
    return [i for i in range(architecture["n_encoder_blocks"]) if (i + 1) % every == 0]


def _metadata(card: dict) -> str:
    load_params = (card.get("dataset") or {}).get("load_params") or {}
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": ["mixture-of-experts", "masked-lm", "moe-encoder", "custom_code"],
    }
    if load_params.get("source") == "hub" and load_params.get("dataset_url"):
        metadata["datasets"] = [load_params["dataset_url"]]
    # The hub's fill-mask widget shows this sentence with the model's own mask token.
    metadata["widget"] = [{"text": EXAMPLE_SENTENCE.format(mask=card.get("mask_token") or "[MASK]")}]
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---"


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _attention(arch: dict) -> str:
    return arch.get("attention", "bidirectional")  # configs saved before the key existed are bidirectional


def _architecture(card: dict) -> str:
    arch = card["architecture"]
    n_experts = arch["n_experts"]
    moe_layers = moe_layer_indices(arch)
    if n_experts == 1:
        routing = "none: `n_experts: 1` is the dense baseline (every feed-forward block is a plain FFN)"
    elif arch.get("router_type") == "expert_choice":
        routing = (
            f"expert choice (each expert picks its tokens; about {arch['top_k_experts']} experts per token "
            f"on average), capacity factor {arch.get('capacity_factor') or 1.0}"
        )
    else:
        capacity = arch.get("capacity_factor")
        routing = f"token choice, top-{arch['top_k_experts']} with the {arch.get('router_gate', 'switch')} gate, " + (
            f"capacity factor {capacity}" if capacity else "dropless"
        )
    n_parameters = card.get("n_parameters")
    rows = [
        ["encoder blocks", arch["n_encoder_blocks"]],
        ["width (embedding_dim)", arch["embedding_dim"]],
        ["self-attention, heads", f"{_attention(arch)}, {arch['num_head']}"],
        ["positions (seq_len)", arch["seq_len"]],
        ["vocabulary", arch["vocab_size"]],
        ["experts per MoE layer", n_experts],
        ["experts per token (top-k)", arch["top_k_experts"]],
        ["expert type, hidden size", f"{arch.get('expert_type', 'mlp')}, {arch['moe_dim']}"],
        ["shared (always-on) experts", arch.get("n_shared_experts", 0)],
        ["router", routing],
        ["MoE layers", ", ".join(f"block {i}" for i in moe_layers) if n_experts > 1 else "none"],
        [
            "aux losses",
            f"load balancing x {arch.get('load_balance_coef')}, router z-loss x {arch.get('router_z_loss_coef')}",
        ],
        ["dropout", arch.get("dropout")],
        ["parameters", f"{n_parameters:,}" if n_parameters is not None else NOT_RECORDED],
    ]
    return (
        "## Architecture and config\n\n"
        f"Pre-LayerNorm encoder blocks ({_attention(arch)} self-attention, then a feed-forward block), token + "
        "position embeddings, a final LayerNorm and a BERT-style MLM head tied to the input embeddings. "
        "The full config is `config.json`.\n\n" + _table(["", "value"], rows)
    )


def _training_data(card: dict) -> str:
    dataset = card.get("dataset") or {}
    load_params = dataset.get("load_params") or {}
    data_params = dataset.get("data_params") or {}
    source = load_params.get("source")
    if source == "hub":
        where = (
            f"the Hugging Face dataset `{load_params.get('dataset_url')}` (text column "
            f"`{load_params.get('text_field')}`, topic column `{load_params.get('topic_field')}`)"
        )
    elif source == "files":
        where = f"local files {', '.join(f'`{name}`' for name in load_params.get('data_files') or [])}"
    elif source == "builtin":
        builtin = load_params.get("builtin") or {}
        where = (
            f"the project's builtin corpus: synthetic, seeded, topic-labelled documents of real English words "
            f"({builtin.get('n_topics')} topics, topic_overlap {builtin.get('topic_overlap')}); not real text"
        )
    else:
        where = NOT_RECORDED
    parts = [f"## Training data\n\nSource: {where}."]
    held_out = data_params.get("eval_topics") or []
    if held_out:
        parts.append(f"Held out of train/valid/test (evaluated apart by step 4): {', '.join(held_out)}.")
    if dataset.get("seed") is not None:
        parts.append(f"Data seed {dataset['seed']}; mask probability {data_params.get('mask_prob')}.")

    manifest = card.get("data") or {}
    counts = manifest.get("counts") or {}
    label_of = {key: f"topic {label}" for label, key in (manifest.get("topics") or {}).items()}
    rows = [
        [
            label_of.get(name, name),
            split.get("documents", ""),
            split.get("real_tokens", ""),
            split.get("masked_tokens", ""),
        ]
        for name, split in counts.items()
        if isinstance(split, dict)
    ]
    if rows:
        parts.append(
            "Sequences written by step 2 (`data_processors/dataset.py`):\n\n"
            + _table(["split", "documents", "real tokens", "masked tokens"], rows)
        )
    tokenizer = manifest.get("tokenizer") or {}
    if tokenizer:
        parts.append(
            f"Tokenizer: {tokenizer.get('name')}, vocabulary {tokenizer.get('vocab_size')}, sequences "
            f"cut or padded to {manifest.get('seq_len')} tokens (saved in this folder)."
        )
    return "\n\n".join(parts)


def _training(card: dict) -> str:
    train = card.get("train") or {}
    if not train:
        return "## Training\n\n" + NOT_RECORDED + "."
    n_processes = card.get("n_processes") or 1
    rows = [
        ["optimizer steps", card.get("total_steps", NOT_RECORDED)],
        [
            "global batch (sequences)",
            f"{train.get('batch_size')} x {train.get('gradient_accumulation_steps', 1)} accumulation",
        ],
        [
            "optimizer",
            f"AdamW, peak learning rate {train.get('learning_rate')}, weight decay "
            f"{train.get('weight_decay')}, linear warmup {train.get('warmup_proportion')} then {train.get('lr_schedule', 'linear')} decay",
        ],
        ["gradient clipping", train.get("max_grad_norm")],
        ["masking", train.get("masking", "static")],
        ["seed", train.get("random_seed")],
        ["device", f"{n_processes} x {card.get('device', NOT_RECORDED)}"],
        ["precision", card.get("mixed_precision", NOT_RECORDED)],
    ]
    if train.get("freeze_router"):
        rows.append(["routers", "frozen at their random initialisation (a control run)"])
    if train.get("router_supervision"):
        rows.append(["routers", f"supervised by {train['router_supervision']} (a control run)"])
    return "## Training\n\n" + _table(["", "value"], rows)


def _evaluation(card: dict) -> str:
    history = card.get("eval_history") or []
    if not history:
        return "## Evaluation\n\nNo validation evaluation was recorded."
    last = history[-1]
    loss = last["eval_mlm_loss"]
    rows = [
        ["MLM loss (nats per masked token)", f"{loss:.4f}"],
        ["perplexity", f"{math.exp(min(loss, 50.0)):.2f}"],
        ["accuracy on masked tokens", f"{last['eval_accuracy']:.4f}"],
    ]
    in_all = f"{len(history)} evaluation{'s' if len(history) > 1 else ''} in all"
    return (
        f"## Evaluation\n\nOn the validation split at the last evaluation (step {last['step']}; {in_all}, "
        f"listed in `trainer_state.json`):\n\n"
        + _table(["", "value"], rows)
        + "\n\nPer-topic test metrics are written by step 4 (`inference/inference.py`)."
    )


def _routing(card: dict) -> str:
    arch = card["architecture"]
    heading = "## Routing summary\n\n"
    if arch["n_experts"] == 1:
        return heading + "None: this is the dense baseline (one FFN per block, no router)."
    counts = card.get("valid_expert_counts")
    caveat = (
        "This is only where tokens went. The full routing analysis (by topic, layer and kind of token) is "
        "step 4's `report.md`, where every number is judged against random routers on the same hidden "
        "states."
    )
    if not counts:
        return heading + "No expert loads were recorded at the end of training. " + caveat
    n_experts = arch["n_experts"]
    rows = []
    for block, layer_counts in zip(moe_layer_indices(arch), counts):
        total = sum(layer_counts) or 1
        shares = [count / total for count in layer_counts]
        entropy = -sum(share * math.log2(share) for share in shares if share > 0)
        rows.append([f"block {block}", " / ".join(f"{share:.1%}" for share in shares), f"{entropy:.2f}"])
    what = (
        "Share of the validation split's picked tokens whose highest-gate expert is each expert (expert choice: "
        "every expert processes exactly its capacity)"
        if arch.get("router_type") == "expert_choice"
        else "Share of the validation split's real tokens sent to each expert"
    )
    return (
        heading + f"{what} at the last evaluation "
        f"(a perfectly balanced layer gives {1 / n_experts:.1%} each; load entropy at most "
        f"{math.log2(n_experts):.2f} bits):\n\n"
        + _table(["MoE layer", "expert load shares (expert 0 / 1 / ...)", "load entropy (bits)"], rows)
        + "\n\n"
        + caveat
    )


def _how_to_load(card: dict) -> str:
    sentence = EXAMPLE_SENTENCE.format(mask=card.get("mask_token") or "[MASK]")
    return (
        "## How to load\n\n"
        "The architecture is custom code shipped in this folder, so pass `trust_remote_code=True` "
        "(read `encoder.py` first if the folder came from someone else):\n\n"
        "```python\n"
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline\n\n"
        'path = "path/to/model"  # this folder\n'
        "model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # else it asks first\n\n"
        'fill_mask = pipeline("fill-mask", model=path, trust_remote_code=True)\n'
        f"print(fill_mask({sentence!r}))\n"
        "```\n\n"
        "The forward pass also returns, per MoE layer, the chosen experts (`expert_indices`) and the router "
        "probabilities (`router_probs`)."
    )
