"""A student member as a standard folder that other tools open as it is, with its heads merged into one.

- A `transformer` member (a cross-encoder, Linear(hidden, 2) heads on the [CLS] state) becomes a
  `BertForSequenceClassification` folder with one output logit: `sentence_transformers.CrossEncoder`,
  `AutoModelForSequenceClassification` and Hugging Face-compatible rerank servers open it. Its logit is
  the mean of the heads' relevance logits (l1 - l0): the heads are linear in the same vector, so their
  mean is one linear head. BERT's classifier reads tanh(pooler(CLS)); the pooler is set to EPS * I and
  the classifier's weights scaled by 1 / EPS, where tanh is linear to within float32 rounding
  (relative error (EPS x)^2 / 3 < 4e-7 for hidden states |x| < 10).
- A `bi-encoder` member (mean-pooled unit vectors u, v of question and passage, heads
  sum_d w[h, d] u_d v_d + b[h]) becomes a `SentenceTransformer` folder: Transformer -> Pooling(mean)
  -> Normalize -> Dense(diag(sqrt(mean_h w[h]))), no bias, identity activation), so that the dot
  product of two embeddings is the mean head's relevance minus its bias (a constant: same ranking).
  A dimension whose mean weight is negative cannot be folded into a symmetric dot product: it is set
  to 0 and counted in the manifest (`clamped_dims`); the folder then approximates the member.
- A `bilstm` member has no standard form: no folder.

How this differs from the served score: the service averages P(relevant) = sigmoid(logit) over heads
and over members; a folder is one member and ranks by its mean logit. The two orders agree when the
heads agree and differ where heads disagree in confidence (the mean of sigmoids is not the sigmoid of
the mean); the test suite and benchmarks/results/peers.md report the MAP difference.

Tokenisation: the service cuts the passage of a pair to fit max_length (question, passage and three
special tokens together); a CrossEncoder cuts `longest_first`, which is the same unless the question
is longer than what is left of the passage; a SentenceTransformer cuts each text alone to max_length,
so a passage longer than the pair budget keeps more tokens there than in the service.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.manifest import StandardFolder
from app.distill.students import BiEncoderStudent, MultiHeadStudent

STANDARD_DIR = "standard"
EPS = 1e-4


def write_standard_folder(
    member: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_length: int
) -> StandardFolder | None:
    """Write `member` as a standard folder at `folder`; None (nothing written) for a kind without one."""
    if isinstance(member, BiEncoderStudent):
        clamped = write_sentence_transformer(member, tokenizer, folder, max_length=max_length)
        return StandardFolder(member="", path=str(folder), format="sentence-transformer", clamped_dims=clamped)
    if isinstance(member, MultiHeadStudent) and member.kind == "transformer" and _is_bert(member.encoder):
        write_cross_encoder(member, tokenizer, folder, max_length=max_length)
        return StandardFolder(member="", path=str(folder), format="cross-encoder")
    return None


def merged_relevance_head(member: MultiHeadStudent) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over heads of the relevance logit l1 - l0, as one linear map: weight [hidden], bias []."""
    weight = torch.stack([h.weight[1] - h.weight[0] for h in member.heads]).mean(0)
    bias = torch.stack([h.bias[1] - h.bias[0] for h in member.heads]).mean(0)
    return weight.detach().clone(), bias.detach().clone()


def write_cross_encoder(
    member: MultiHeadStudent, tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_length: int
) -> None:
    """A one-logit BertForSequenceClassification whose logit is the member's mean relevance logit."""
    config = BertConfig.from_dict(member.encoder.config.to_dict())
    config.num_labels = 1
    config.id2label, config.label2id = {0: "relevant"}, {"relevant": 0}
    config.architectures = ["BertForSequenceClassification"]
    model = BertForSequenceClassification(config).eval()
    missing, unexpected = model.bert.load_state_dict(member.encoder.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise ValueError(f"student encoder does not fit BertModel: missing {missing}, unexpected {unexpected}")
    weight, bias = merged_relevance_head(member)
    hidden = config.hidden_size
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.eye(hidden) * EPS)
        model.bert.pooler.dense.bias.zero_()
        model.classifier.weight.copy_(weight[None, :] / EPS)
        model.classifier.bias.copy_(bias[None])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(tokenizer, folder, max_length=max_length)


def write_sentence_transformer(
    member: BiEncoderStudent, tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_length: int
) -> int:
    """A SentenceTransformer folder whose dot products rank as the member's mean head; returns clamped dims.

    Written in the long-standing layout (module types `sentence_transformers.models.*`, pooling flags) that
    sentence-transformers 2.x to 6.x and the servers built on them read alike.
    """
    mean_weight = member.heads.weight.detach().mean(0)
    clamped = int((mean_weight < 0).sum())
    hidden = mean_weight.numel()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    member.encoder.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(tokenizer, folder, max_length=max_length)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"), ("3_Dense", "Dense")]
    _write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)
    ])  # fmt: skip
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "dot",
    })  # fmt: skip
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })  # fmt: skip
    (folder / "2_Normalize").mkdir()
    _write_json(folder / "3_Dense" / "config.json", {
        "in_features": hidden, "out_features": hidden, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    })  # fmt: skip
    weight = torch.diag(mean_weight.clamp(min=0).sqrt()).contiguous()
    save_file({"linear.weight": weight}, str(folder / "3_Dense" / "model.safetensors"))
    return clamped


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_length: int) -> None:
    """The tokenizer files, with model_max_length set so that other tools cut pairs where the member does."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = max_length
    path.write_text(json.dumps(config, indent=2))


def _is_bert(encoder: nn.Module) -> bool:
    config = getattr(encoder, "config", None)
    return getattr(config, "model_type", None) == "bert" and not config.is_decoder
