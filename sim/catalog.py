"""Built-in catalog of LLMs: list prices and per-task-family accuracy and answer length.

The synthetic workload (sim/workload.py) is calibrated to these figures. Every number is a
published figure whose source is named next to it; numbers that are estimates say so.

Task families and the benchmark each one stands for:

    knowledge_qa  MMLU             reasoning  ARC-Challenge     commonsense  Winogrande
    code          MBPP / HumanEval math       GSM8K             open_chat    MT-Bench

Accuracy is the mean 0/1 score on that benchmark, in [0, 1]. For open_chat it is the MT-Bench
score (GPT-4 judge, 1..10) divided by 10, the way RouterBench puts MT-Bench on a [0, 1] scale.
Answer lengths are in output tokens; where a source gives characters we divide by
`CHARS_PER_TOKEN` (about 4 characters per token for English text with GPT-style BPE
tokenizers) and keep at least one token.

Sources (cited by tag in the comments below):

[RB]      RouterBench 0-shot release (Hu et al. 2024, arXiv 2403.12031) as measured on
          ../shared/data/routerbench/routerbench_arc_mbpp_winogrande.csv; the per-model means
          are tabulated in ../shared/data/routerbench/models.yaml and README.md (quality and
          response_chars per eval_name; prompt lengths measured on the CSV's prompt column).
[RB-$]    RouterBench list prices, withmartian/routerbench routers/common.py TOKEN_COSTS, as
          restated in ../shared/data/routerbench/README.md (USD per 1M tokens).
[GPT4TR]  OpenAI, "GPT-4 Technical Report", arXiv 2303.08774, Table 2 (GPT-4 and GPT-3.5).
[C2CARD]  Anthropic, "Model Card and Evaluations for Claude Models" (Claude 2), July 2023.
[CI12]    Anthropic, Claude Instant 1.2 release note, Aug 2023 (recalled; no stored copy was
          available to re-check it).
[LMSYS]   LMSYS Chatbot Arena leaderboard, Nov/Dec 2023 snapshot: MT-bench and MMLU columns.
[MIXTRAL] Jiang et al., "Mixtral of Experts", arXiv 2401.04088: Table 2 (base models,
          re-evaluated by Mistral AI) and section 4 (Mixtral 8x7B Instruct MT-Bench 8.30).
[YI]      01-ai/Yi repository, docs/benchmarks.md, "Chat Model Performance" table.
[L31]     Meta, Llama 3.1 model card (meta-llama/llama-models, models/llama3_1/MODEL_CARD.md):
          "Instruction tuned models" table unless marked (base).
[AE2]     AlpacaEval 2.0 leaderboard (tatsu-lab/alpaca_eval,
          weighted_alpaca_eval_gpt4_turbo_leaderboard.csv), column avg_length: mean answer
          length in characters on open-ended instructions.
[TOGETHER] together.ai serverless list prices for Meta-Llama-3.1-{8B,70B}-Instruct-Turbo
          (July 2024 launch prices; the 70B figure also appears in LiteLLM's price table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sim.errors import DataError

CHARS_PER_TOKEN = 4.0

FAMILIES: tuple[str, ...] = (
    "knowledge_qa",
    "reasoning",
    "commonsense",
    "code",
    "math",
    "open_chat",
)


def _tok(chars: float) -> float:
    """Answer length in characters -> tokens (~4 characters per token), at least one token."""
    return max(1.0, chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class FamilyStats:
    """One model on one task family: mean accuracy in [0, 1] and mean answer length."""

    accuracy: float
    output_tokens: float


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model: list prices (USD per 1M tokens) and per-family figures."""

    name: str
    price_in_per_mtok: float
    price_out_per_mtok: float
    families: Mapping[str, FamilyStats]

    def stats(self, family: str) -> FamilyStats:
        try:
            return self.families[family]
        except KeyError:
            raise DataError(
                f"unknown task family {family!r}; families: {', '.join(FAMILIES)}",
                source=f"catalog model {self.name!r}",
            ) from None


@dataclass(frozen=True)
class FamilyInfo:
    """One task family: the benchmark it stands for and its prompt length distribution."""

    name: str
    benchmark: str
    input_tokens: float  # mean prompt length in tokens
    input_cv: float  # coefficient of variation of the prompt length


def _entry(name: str, prices: tuple[float, float], **fams: FamilyStats) -> ModelEntry:
    """A catalog entry; `prices` are (input, output) USD per 1M tokens."""
    missing = set(FAMILIES) - set(fams)
    if missing:  # pragma: no cover - guards edits of the table below
        raise AssertionError(f"catalog entry {name!r} lacks families {sorted(missing)}")
    ordered = {f: fams[f] for f in FAMILIES}
    return ModelEntry(name, prices[0], prices[1], MappingProxyType(ordered))


S = FamilyStats

# Multiple-choice answers (MMLU, ARC, Winogrande) are a letter or a word: RouterBench measures
# 1 to 3 characters [RB], i.e. one token. MMLU lengths are not in [RB]; they are ESTIMATES set
# equal to the same model's ARC answer length (same letter-answer format).
# Math answer lengths are ESTIMATES for every model: half of the model's open_chat length
# (a GSM8K chain-of-thought solution is a few lines of arithmetic, shorter than a typical
# open-ended answer, and scales with the model's verbosity).

_MODELS: tuple[ModelEntry, ...] = (
    _entry(
        "gpt-4",  # RouterBench's gpt-4-1106-preview (GPT-4 Turbo)
        (10.0, 30.0),  # [RB-$] gpt-4-1106-preview
        knowledge_qa=S(0.864, _tok(1.0)),  # MMLU 86.4 5-shot [GPT4TR] (GPT-4 March 2023)
        reasoning=S(0.9544, _tok(1.0)),  # ARC 0.9544, 1.0 chars [RB]
        commonsense=S(0.8587, _tok(1.0)),  # Winogrande 0.8587, 1.0 chars [RB]
        code=S(0.6862, _tok(1230.9)),  # MBPP 0.6862, 1230.9 chars [RB]
        math=S(0.920, _tok(2049) / 2),  # GSM8K 92.0 5-shot CoT [GPT4TR]; length ESTIMATE
        open_chat=S(0.932, _tok(2049)),  # MT-bench 9.32 GPT-4-Turbo [LMSYS]; 2049 ch [AE2]
    ),
    _entry(
        "gpt-3.5-turbo",  # RouterBench's gpt-3.5-turbo-1106
        (1.0, 2.0),  # [RB-$] gpt-3.5-turbo-1106
        knowledge_qa=S(0.700, _tok(1.0)),  # MMLU 70.0 5-shot [GPT4TR]
        reasoning=S(0.8340, _tok(1.0)),  # ARC 0.8340, 1.0 chars [RB]
        commonsense=S(0.6409, _tok(1.0)),  # Winogrande 0.6409, 1.0 chars [RB]
        code=S(0.6534, _tok(588.3)),  # MBPP 0.6534, 588.3 chars [RB]
        math=S(0.571, _tok(796) / 2),  # GSM8K 57.1 5-shot [GPT4TR]; length ESTIMATE
        # MT-bench 7.94: GPT-3.5-turbo in the MT-Bench paper (Zheng et al. 2023, the March
        # 2023 model, not -1106; kept as the conservative figure); 796 chars, -1106 [AE2]
        open_chat=S(0.794, _tok(796)),
    ),
    _entry(
        "claude-v2",
        (8.0, 24.0),  # [RB-$] claude-v2
        knowledge_qa=S(0.785, _tok(3.0)),  # MMLU 78.5 5-shot CoT [C2CARD], same in [LMSYS]
        # ARC 0.5871, 3.0 chars [RB]: low because ~550 answers are cut off (RB README quirk)
        reasoning=S(0.5871, _tok(3.0)),
        commonsense=S(0.4775, _tok(2.4)),  # Winogrande 0.4775, 2.4 chars [RB]
        code=S(0.6417, _tok(891.2)),  # MBPP 0.6417, 891.2 chars [RB]
        math=S(0.880, _tok(1069) / 2),  # GSM8K 88.0 0-shot CoT [C2CARD]; length ESTIMATE
        open_chat=S(0.806, _tok(1069)),  # MT-bench 8.06 [LMSYS]; claude-2 1069 chars [AE2]
    ),
    _entry(
        "claude-instant-v1",
        (0.8, 2.4),  # [RB-$] claude-instant-v1
        knowledge_qa=S(0.734, _tok(1.1)),  # MMLU 73.4 [LMSYS] (Claude-instant-1)
        reasoning=S(0.8286, _tok(1.1)),  # ARC 0.8286, 1.1 chars [RB]
        commonsense=S(0.5170, _tok(1.3)),  # Winogrande 0.5170, 1.3 chars [RB]
        code=S(0.6042, _tok(713.1)),  # MBPP 0.6042, 713.1 chars [RB]
        math=S(0.867, _tok(1112) / 2),  # GSM8K 86.7 (Claude Instant 1.2) [CI12]; len ESTIMATE
        open_chat=S(0.785, _tok(1112)),  # MT-bench 7.85 [LMSYS]; instant-1.2 1112 ch [AE2]
    ),
    _entry(
        "llama-2-70b",  # RouterBench's meta/llama-2-70b-chat
        (0.9, 0.9),  # [RB-$] meta/llama-2-70b-chat
        knowledge_qa=S(0.630, _tok(2.0)),  # MMLU 63.0 Llama-2-70b-chat [LMSYS]
        reasoning=S(0.8034, _tok(2.0)),  # ARC 0.8034, 2.0 chars [RB]
        commonsense=S(0.5028, _tok(2.0)),  # Winogrande 0.5028, 2.0 chars [RB]
        code=S(0.3302, _tok(1171.5)),  # MBPP 0.3302, 1171.5 chars [RB]
        math=S(0.5868, _tok(1790) / 2),  # GSM8K 58.68 4-shot LLaMA2-70B-Chat [YI]; len ESTIMATE
        open_chat=S(0.686, _tok(1790)),  # MT-bench 6.86 [LMSYS]; llama-2-70b-chat 1790 ch [AE2]
    ),
    _entry(
        "mixtral-8x7b",  # RouterBench's mistralai/mixtral-8x7b-chat
        (0.6, 0.6),  # [RB-$] mistralai/mixtral-8x7b-chat
        knowledge_qa=S(0.706, _tok(2.0)),  # MMLU 70.6 5-shot, base [MIXTRAL] Table 2
        reasoning=S(0.8544, _tok(2.0)),  # ARC 0.8544, 2.0 chars [RB]
        commonsense=S(0.6788, _tok(2.0)),  # Winogrande 0.6788, 2.0 chars [RB]
        code=S(0.5410, _tok(1044.2)),  # MBPP 0.5410, 1044.2 chars [RB]
        math=S(0.744, _tok(1465) / 2),  # GSM8K 74.4 maj@8, base [MIXTRAL]; length ESTIMATE
        open_chat=S(0.830, _tok(1465)),  # MT-Bench 8.30 Instruct [MIXTRAL]; 1465 chars [AE2]
    ),
    _entry(
        "mistral-7b",  # RouterBench's mistralai/mistral-7b-chat
        (0.2, 0.2),  # [RB-$] mistralai/mistral-7b-chat
        knowledge_qa=S(0.554, _tok(2.0)),  # MMLU 55.4 Mistral-7B-Instruct-v0.1 [LMSYS]
        reasoning=S(0.6701, _tok(2.0)),  # ARC 0.6701, 2.0 chars [RB]
        commonsense=S(0.5659, _tok(2.0)),  # Winogrande 0.5659, 2.0 chars [RB]
        code=S(0.3443, _tok(903.4)),  # MBPP 0.3443, 903.4 chars [RB]
        math=S(0.500, _tok(1676) / 2),  # GSM8K 50.0 maj@8, base [MIXTRAL]; length ESTIMATE
        # MT-bench 6.84 Mistral-7B-Instruct-v0.1 [LMSYS]; 1676 chars, Instruct-v0.2 [AE2]
        open_chat=S(0.684, _tok(1676)),
    ),
    _entry(
        "yi-34b",  # RouterBench's zero-one-ai/Yi-34B-Chat
        (0.8, 0.8),  # [RB-$] zero-one-ai/Yi-34B-Chat
        knowledge_qa=S(0.7346, _tok(1.0)),  # MMLU 73.46 5-shot Yi-34B-Chat [YI]
        reasoning=S(0.9034, _tok(1.0)),  # ARC 0.9034, 1.0 chars [RB]
        commonsense=S(0.7537, _tok(1.0)),  # Winogrande 0.7537, 1.0 chars [RB]
        code=S(0.3864, _tok(1049.7)),  # MBPP 0.3864, 1049.7 chars [RB]
        math=S(0.7597, _tok(2123) / 2),  # GSM8K 75.97 4-shot Yi-34B-Chat [YI]; len ESTIMATE
        # ESTIMATE 7.5: no published MT-bench found; between Llama-2-70b-chat (6.86) and
        # Claude-instant-1 (7.85) [LMSYS], as its Arena rank suggests. 2123 chars [AE2]
        open_chat=S(0.75, _tok(2123)),
    ),
    _entry(
        "llama-3.1-8b",  # Llama 3.1 8B Instruct (not in RouterBench)
        (0.18, 0.18),  # [TOGETHER] Meta-Llama-3.1-8B-Instruct-Turbo (recalled, not re-checked)
        knowledge_qa=S(0.694, _tok(1.0)),  # MMLU 69.4 5-shot [L31]; length ESTIMATE 1 token
        reasoning=S(0.834, _tok(1.0)),  # ARC-C 83.4 0-shot [L31]; length ESTIMATE 1 token
        # Winogrande 60.5 5-shot, BASE model [L31] (no instruct figure); length ESTIMATE
        commonsense=S(0.605, _tok(1.0)),
        # HumanEval 72.6 pass@1 [L31]; length ESTIMATE: mean MBPP answer of the 11 RouterBench
        # models, 880.2 chars [RB]
        code=S(0.726, _tok(880.2)),
        math=S(0.845, _tok(2181) / 2),  # GSM8K 84.5 8-shot CoT [L31]; length ESTIMATE
        # Proxy: IFEval 80.4 [L31] (no MT-bench published); 2181 chars, -Turbo [AE2]
        open_chat=S(0.804, _tok(2181)),
    ),
    _entry(
        "llama-3.1-70b",  # Llama 3.1 70B Instruct (not in RouterBench)
        (0.88, 0.88),  # [TOGETHER] Meta-Llama-3.1-70B-Instruct-Turbo
        knowledge_qa=S(0.836, _tok(1.0)),  # MMLU 83.6 5-shot [L31]; length ESTIMATE 1 token
        reasoning=S(0.948, _tok(1.0)),  # ARC-C 94.8 0-shot [L31]; length ESTIMATE 1 token
        # Winogrande 83.3 5-shot, BASE model [L31] (no instruct figure); length ESTIMATE
        commonsense=S(0.833, _tok(1.0)),
        code=S(0.805, _tok(880.2)),  # HumanEval 80.5 pass@1 [L31]; length ESTIMATE as 8b
        math=S(0.951, _tok(2044) / 2),  # GSM8K 95.1 8-shot CoT [L31]; length ESTIMATE
        # Proxy: IFEval 87.5 [L31] (no MT-bench published); 2044 chars, -Turbo [AE2]
        open_chat=S(0.875, _tok(2044)),
    ),
)

_BY_NAME: Mapping[str, ModelEntry] = MappingProxyType({m.name: m for m in _MODELS})

_FAMILY_INFO: Mapping[str, FamilyInfo] = MappingProxyType(
    {
        # ESTIMATE: RouterBench's MMLU prompts are not in [RB]; set like its few-shot ARC
        # prompts (~500 tokens) plus longer MMLU questions.
        "knowledge_qa": FamilyInfo("knowledge_qa", "MMLU", 600.0, 0.3),
        # ARC-Challenge few-shot prompts: mean 2004.2 chars, cv 0.06 [RB]
        "reasoning": FamilyInfo("reasoning", "ARC-Challenge", 2004.2 / CHARS_PER_TOKEN, 0.06),
        # Winogrande few-shot prompts: mean 1414.6 chars, cv 0.013 [RB]
        "commonsense": FamilyInfo("commonsense", "Winogrande", 1414.6 / CHARS_PER_TOKEN, 0.013),
        # MBPP task sentences: mean 92.6 chars, cv 0.44 [RB]
        "code": FamilyInfo("code", "MBPP", 92.6 / CHARS_PER_TOKEN, 0.44),
        # ESTIMATE: a 0-shot GSM8K word problem of a few sentences.
        "math": FamilyInfo("math", "GSM8K", 60.0, 0.4),
        # ESTIMATE: one MT-Bench-style user turn; chat prompts vary widely.
        "open_chat": FamilyInfo("open_chat", "MT-Bench", 80.0, 0.8),
    }
)


def known_models() -> tuple[str, ...]:
    """Names of the catalog's models, in catalog order."""
    return tuple(_BY_NAME)


def model_entry(name: str) -> ModelEntry:
    """The catalog entry of `name`; an unknown name raises DataError listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise DataError(
            f"unknown model {name!r}; the built-in catalog has: {', '.join(_BY_NAME)}",
            source="built-in LLM catalog",
        ) from None


def model_index(name: str) -> int:
    """Position of `name` in the catalog (a stable key for per-model random streams)."""
    model_entry(name)
    return tuple(_BY_NAME).index(name)


def family_info(name: str) -> FamilyInfo:
    """Benchmark and prompt length of a task family; unknown -> DataError."""
    try:
        return _FAMILY_INFO[name]
    except KeyError:
        raise DataError(
            f"unknown task family {name!r}; families: {', '.join(FAMILIES)}",
            source="built-in LLM catalog",
        ) from None
