"""Small English and Chinese documents for the data tests, written here: no downloads."""

from pathlib import Path

import tokenizers

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT / "data" / "shakespeare"

# Distinct Chinese paragraphs (classical poems and plain modern prose), each long enough to
# pass the default length filter.
CHINESE = [
    "君不见黄河之水天上来，奔流到海不复回。君不见高堂明镜悲白发，朝如青丝暮成雪。"
    "人生得意须尽欢，莫使金樽空对月。天生我材必有用，千金散尽还复来。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。白日依山尽，黄河入海流。"
    "欲穷千里目，更上一层楼。床前明月光，疑是地上霜。",
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有三千多年的"
    "建城史，留下了故宫、天坛和长城等众多名胜古迹。",
    "机器学习是人工智能的一个分支，它研究计算机怎样从数据中自动学习规律，并利用这些规律对"
    "未知的数据进行预测。近年来，深度学习在语音识别和图像理解方面取得了很大进展。",
    "今天天气很好，我们一起去公园散步。公园里有很多人，有的在跑步，有的在下棋，还有几个孩子"
    "在草地上放风筝，大家都显得非常开心。",
]


def english_paragraphs(
    play: str = "hamlet.txt", count: int = 40, min_chars: int = 200
) -> list[str]:
    """The first `count` speeches of a bundled play that hold at least `min_chars` characters."""
    text = (SHAKESPEARE / play).read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]
    return paragraphs[:count]


def train_hf_tokenizer(path: Path, text_file: Path, eod: str = "<|endoftext|>") -> Path:
    """A small byte-level BPE tokenizer.json, as Hugging Face models ship them."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[eod],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(text_file.read_text().splitlines(), trainer)
    model.save(str(path))
    return path
