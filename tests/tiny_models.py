"""Tiny models for tests, built from configs with tokenizers trained on the spot (no network).

GPT-2 (writing, dialogue), BART (summarize, translate, seq2seq writing), DistilBERT for
sequence classification (sentiment) and for question answering. Each is 2 layers × 64 wide,
random weights, saved with its tokenizer to a folder and registered by path in an llmos.toml.
"""

from __future__ import annotations

import itertools
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the old man", "a robot",
            "the river", "this phone", "the city"]
VERBS = ["likes", "sees", "builds", "finds", "paints", "carries", "answers", "loves", "breaks", "opens"]
OBJECTS = ["a red ball", "the blue door", "many books", "fresh bread", "the small box", "a long road",
           "green apples", "the question", "a new song", "the window"]
EXTRA = ["Hello, how are you?", "I am fine, thank you.", "What is the capital of France?",
         "Paris is the capital of France.", "Translate this sentence.", "Summaries are short.",
         "写一篇关于人工智能的博客文章", "我想订一张去北京的机票", "Guten Morgen, wie geht es dir?"]


def corpus() -> list[str]:
    sents = [f"{s.capitalize()} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    return sents[::3] + EXTRA


def bpe_tokenizer(bos: str, eos: str, pad: str, template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [pad, bos, eos, "<unk>"] if pad != eos else [bos, eos, "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(dict.fromkeys(specials)), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=600, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus(), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"])


def build_gpt2(folder: Path, n_positions: int = 128, n_layer: int = 2, n_embd: int = 64,
               n_head: int = 2) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", template=False)
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_bart(folder: Path) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = bpe_tokenizer("<s>", "</s>", "<pad>", template=True)
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                     forced_eos_token_id=tok.eos_token_id)
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_distilbert(folder: Path, head: str) -> Path:
    import torch
    from transformers import (DistilBertConfig, DistilBertForQuestionAnswering,
                              DistilBertForSequenceClassification)

    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tok), dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                           max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    cls = DistilBertForSequenceClassification if head == "classifier" else DistilBertForQuestionAnswering
    cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    """Every tiny model under `root`; returns their folders by kind."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return {
        "gpt2": build_gpt2(root / "tiny-gpt2"),
        "bart": build_bart(root / "tiny-bart"),
        "classifier": build_distilbert(root / "tiny-sst2", "classifier"),
        "qa": build_distilbert(root / "tiny-squad", "qa"),
    }


def write_config(path: Path, folders: dict[str, Path], openai_url: str | None = None) -> Path:
    """An llmos.toml that registers the tiny models (and, given a URL, the openai engine)."""
    lines = f'''
[models.tiny-gpt2]
source = "{folders['gpt2']}"
kind = "causal-lm"
tasks = ["writing", "dialogue"]
max_new_tokens = 8
max_batch_size = 8
options = {{ min_new_tokens = 2 }}

[models.dialogpt]
source = "{folders['gpt2']}"
kind = "causal-lm"
tasks = ["dialogue", "writing"]
max_new_tokens = 8
options = {{ min_new_tokens = 2 }}

[models.tiny-bart]
source = "{folders['bart']}"
kind = "seq2seq"
tasks = ["summarize", "translate", "writing"]
language_pairs = [["en", "de"], ["en", "zh"]]
max_new_tokens = 8
options = {{ min_new_tokens = 2 }}

[models.sst2]
source = "{folders['classifier']}"
kind = "classifier"
tasks = ["sentiment"]

[models.squad]
source = "{folders['qa']}"
kind = "qa"
tasks = ["qa"]
max_input_tokens = 48
'''
    if openai_url:
        lines += f'''
[models.gpt3]
engine = "openai"
source = "{openai_url}"
tasks = ["writing", "dialogue", "summarize", "translate", "embed"]
max_new_tokens = 8
options = {{ model = "tiny-gpt2", api_key_env = "LLMOS_TEST_OPENAI_KEY", backoff_s = 0.05 }}
'''
    path.write_text(lines)
    return path
