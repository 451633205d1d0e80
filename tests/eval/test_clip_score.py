"""CLIP score: the cosine of a picture's and a text's CLIP embeddings, through the model's own
preprocessing, for uint8 tensors and PIL images alike, in batches."""

import pytest
import torch
from PIL import Image

from mmflow.eval.clip_score import clip_scores
from mmflow.models.clip import ClipSpec, load_clip, resolve


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(resolve(ClipSpec(arch="mmflow-clip-tiny")))


def pictures(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


TEXTS = ["a red circle on a white background", "a blue square on a black background",
         "a green triangle on a gray background"]  # fmt: skip


def test_the_score_is_the_cosine_of_the_normalised_embeddings(clip):
    pics = pictures(3)
    got = clip_scores(clip, pics, TEXTS)
    with torch.no_grad():
        x = torch.stack(
            [clip.preprocess(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pics]
        )
        img = clip.model.encode_image(x)
        txt = clip.model.encode_text(clip.tokenizer(TEXTS))
    want = torch.nn.functional.cosine_similarity(img, txt)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    # pairs, not a matrix: the same pictures against other texts score differently
    assert not torch.allclose(got, clip_scores(clip, pics, TEXTS[1:] + TEXTS[:1]))


def test_pil_images_and_batches_give_the_same_scores(clip):
    pics = pictures(5)
    texts = [TEXTS[i % 3] for i in range(5)]
    whole = clip_scores(clip, pics, texts)
    as_pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pics]
    assert torch.allclose(clip_scores(clip, as_pil, texts, batch_size=2), whole, atol=1e-5)


def test_mismatched_lengths_and_bad_pictures_are_refused(clip):
    with pytest.raises(ValueError, match="3 pictures for 2 texts"):
        clip_scores(clip, pictures(3), TEXTS[:2])
    with pytest.raises(ValueError, match="uint8"):
        clip_scores(clip, pictures(1).float(), TEXTS[:1])
