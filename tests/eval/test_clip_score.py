import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from tfmq_exp.errors import UserError
from tfmq_exp.eval.clip_score import clip_score, clipped_cosine, load_clip

VOCAB = 64


class CharTokenizer:
    """Offline stand-in for CLIPTokenizer: one id per character, BOS = 1, EOS = 2 (argmax pooling)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[1] + [3 + ord(ch) % (VOCAB - 3) for ch in t][: max_length - 2] + [2] for t in texts]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            eos_token_id=2,
            bos_token_id=1,
        ),
        vision_config=dict(
            image_size=30,
            patch_size=6,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return CLIPModel(cfg).eval(), processor, CharTokenizer()


def test_clip_score_equals_manual_cosine(tiny_clip):
    model, processor, tokenizer = tiny_clip
    images = torch.randint(
        0, 256, (5, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    captions = ["a digit", "zero", "a photo of a seven", "two", "noise"]
    score = clip_score(images, captions, model, processor, tokenizer, batch_size=2)

    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")[
        "pixel_values"
    ]
    text = tokenizer(captions)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**text).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
    assert score == pytest.approx(float(cos.clamp_min(0).mean()), abs=1e-6)
    assert 0.0 <= score <= 1.0


def test_grayscale_images_are_accepted(tiny_clip):
    model, processor, tokenizer = tiny_clip
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    rgb = gray.expand(-1, 3, -1, -1)
    caps = ["one", "two"]
    assert clip_score(gray, caps, model, processor, tokenizer) == pytest.approx(
        clip_score(rgb, caps, model, processor, tokenizer)
    )


def test_clipped_cosine_by_hand():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    assert clipped_cosine(img, txt).tolist() == pytest.approx([0.0, 0.0, 2**-0.5])  # negative clipped at 0


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="clip_model"):
        load_clip(str(tmp_path / "no_such_model"))
