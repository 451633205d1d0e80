"""The joint-stream transformer's training task: both directions in one model.

Data: the token table streams through Ray Data (``ray.train.get_dataset_shard("train")``),
held-out keys already filtered out by the stage, read once and replayed from memory after
that when the rank's share fits the stage's ``cache_mb``; each batch becomes text->image
sequences and, for ``i2t_share`` of its rows, image->text ones, with the caption dropped for
``cond_dropout`` of the text->image rows (classifier-free guidance needs an unconditional
model). Loss: the two streams' mean NLLs, weighted (:func:`mmflow.models.joint.joint_losses`).

Eval (rank 0), on keys held out of every training stage (:class:`JointEvalSet`, prepared by
the stage): per-stream validation NLL; pictures drawn from held-out single-object prompts,
with guidance and without, judged by an attribute classifier trained on the real pictures'
ground truth; with a CLIP, the CLIP score of the drawn pictures against their prompts beside
that of the real pictures (the one drawing figure where there is no ground truth); captions
written for held-out pictures, checked against their scenes; and a grid of drawn pictures with
their prompts in the stage's MLflow run.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from mmflow.generate.sampling import SamplingConfig
from mmflow.models.joint import JointConfig, JointVocab
from mmflow.tasks.joint_eval import JointEvalSet
from mmflow.train.config import TrainConfig, TrainTask

# added to the sampling seed for the guidance sweep's draws under ``auto`` guidance: far past
# the per-batch offsets a draw adds (Painter.draw_ids), so no sweep draw repeats a reported one
TUNING_SEED_OFFSET = 1_000_003


class JointTask(TrainTask):
    """Model, data, loss and eval for the harness. Pickled to each worker; caches per process."""

    def __init__(
        self,
        *,
        cfg: JointConfig,
        vocab: JointVocab,
        train: TrainConfig,
        i2t_share: float,
        cond_dropout: float,
        loss_weights: dict[str, float],
        shuffle_buffer: int,
        sampling: SamplingConfig,
        eval_set: JointEvalSet,
        vqgan_uri: str,
        tokenizer_json: str,
        save_meta: dict[str, Any],
        activation_checkpointing: bool = False,
        guidance_sweep: tuple[float, ...] = (),
        threads: int = 1,
        preview: int = 16,
        tracking_uri: str = "",
        run_id: str | None = None,
        replay_rows: bool = False,
        clip: dict[str, Any] | None = None,
        auto_guidance: bool = False,
    ):
        self.cfg, self.vocab, self.train = cfg, vocab, train
        self.i2t_share, self.cond_dropout, self.loss_weights = i2t_share, cond_dropout, loss_weights
        self.shuffle_buffer, self.sampling, self.eval_set = shuffle_buffer, sampling, eval_set
        self.vqgan_uri, self.tokenizer_json, self.save_meta = vqgan_uri, tokenizer_json, save_meta
        self.activation_checkpointing, self.threads, self.preview = (
            activation_checkpointing,
            threads,
            preview,
        )
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.guidance_sweep = tuple(guidance_sweep)
        self.auto_guidance = auto_guidance  # each eval draws with the sweep's best scale
        self.replay_rows = replay_rows
        self.clip = clip  # {"uri", "run_id", "spec"}: where rank 0 loads the scoring CLIP from
        self.tokens_per_sample = vocab.seq_len  # the harness reports tokens/s
        self._painter = self._judge = self._clip = self._real_clip_score = None
        self._step = 0

    # --- model --------------------------------------------------------------------------------
    def build_model(self):
        import torch

        from mmflow.models.joint import JointTransformer

        torch.set_num_threads(self.threads)
        model = JointTransformer(self.cfg, self.vocab)
        if self.activation_checkpointing:
            model.decoder.enable_checkpointing()
        return model

    def save(self, model, out_dir: str) -> None:
        from mmflow.generate.joint import save_extras
        from mmflow.models.joint import save_joint

        steps = self._step or self.train.max_steps
        save_joint(model, out_dir, self.vocab, self.save_meta["arch"], steps=steps)
        save_extras(out_dir, self.tokenizer_json, **self.save_meta)

    # --- data ---------------------------------------------------------------------------------
    def train_batches(self, rank: int, world_size: int, start_step: int) -> Iterator[dict]:
        import ray.train

        from mmflow.tasks.data import prefetched

        # the shard in the worker's own thread (Ray Train's context); the sequences in another
        return prefetched(self._batches(ray.train.get_dataset_shard("train"), rank, start_step))

    def _batches(self, shard, rank: int, start_step: int) -> Iterator[dict]:
        """Sequences, forever: the first epoch read from the Ray Data shard through a shuffle
        buffer; later ones replayed from memory in a fresh order when ``replay_rows`` (the
        stage decides it for every rank alike: a rank that stopped reading its split while
        another still read would leave that one waiting), else streamed again. Each streamed
        epoch starts a Ray Data execution beside the training step: several seconds of a
        2-core machine's time, every ~90 steps in the quickstart."""
        import torch

        from mmflow.train.epochs import Epochs, batches

        gen = torch.Generator().manual_seed(self.train.seed * 1_000_003 + rank * 7919 + start_step)
        rng = random.Random(f"{self.train.seed}-{rank}-{start_step}")
        epochs = Epochs(self.shuffle_buffer, None if self.replay_rows else 0)

        def stream() -> Iterator[tuple[list[int], list[int]]]:
            for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
                texts, images = batch["text_ids"], batch["image_tokens"]
                yield from zip(
                    [t.tolist() for t in texts], [c.tolist() for c in images], strict=True
                )

        micro = start_step * self.train.grad_accum
        empty = f"rank {rank}: no training rows in its share of the token table"
        for rows in batches(lambda: epochs.epoch(stream, rng), self.train.batch_size, empty):
            texts, images = zip(*rows, strict=True)
            seq = self.vocab.batch(texts, images, i2t_share=self.i2t_share,
                                   cond_dropout=self.cond_dropout, generator=gen)  # fmt: skip
            inputs, targets = seq.inputs_targets()
            # the step travels with the batch: the grid's name and the saved step count
            yield {"inputs": inputs, "targets": targets, "step": micro // self.train.grad_accum}
            micro += 1

    # --- loss and eval ----------------------------------------------------------------------------
    def loss(self, model, batch):
        self._step = batch["step"] + 1
        _, losses = model(batch["inputs"], batch["targets"], self.loss_weights)
        return losses["loss"], {k: float(losses[k]) for k in ("text_nll", "image_nll", "z_loss")}

    def evaluate(self, model) -> dict[str, float]:
        import torch

        out = self._val_nll(model)
        es = self.eval_set
        if not es.prompt_ids and not es.caption_codes:
            return out
        painter = self._painter_for(model)
        if es.prompt_ids:
            sweep = self._guidance_sweep(painter)
            if self.auto_guidance and sweep:
                self._use_guidance(sweep["t2i_best_guidance"])
            guided = painter.draw_ids(es.prompt_ids, self.sampling)
            plain = painter.draw_ids(es.prompt_ids, replace(self.sampling, guidance_scale=1.0))
            out.update(self._judged(guided, ""))
            out.update(self._judged(plain, "_noguide"))
            out.update(self._clip_scored(guided, plain))
            out.update(sweep, t2i_guidance=self.sampling.guidance_scale)
            self._log_grid(guided[: self.preview], es.prompts[: self.preview])
        if es.caption_codes:
            from mmflow.eval.joint import i2t_scores

            greedy = replace(self.sampling, temperature=0.0, guidance_scale=1.0)
            codes = torch.tensor(es.caption_codes, dtype=torch.long)
            captions = painter.caption_codes(codes, greedy)
            out.update(i2t_scores(captions, es.caption_scenes))
        return out

    def _guidance_sweep(self, painter) -> dict[str, float]:
        """Every scale of ``guidance_sweep`` drawn and scored, by the judge's ``t2i_match`` or,
        without ground truth, the CLIP score: the best score and its scale (the best scale
        falls as a model trains). With ``auto`` guidance the sweep draws with a seed of its
        own, so the scale is chosen on other draws than the figures then reported with it."""
        judged = self.eval_set.judge_state is not None
        if not self.guidance_sweep or not (judged or self.clip):
            return {}
        seed = self.sampling.seed + (TUNING_SEED_OFFSET if self.auto_guidance else 0)
        name = "t2i_match_best" if judged else "t2i_clip_score_best"
        best_scale, best = 0.0, float("-inf")
        for scale in self.guidance_sweep:
            drawn = painter.draw_ids(
                self.eval_set.prompt_ids, replace(self.sampling, guidance_scale=scale, seed=seed)
            )
            score = self._judged(drawn, "")["t2i_match"] if judged else self._clip_mean(drawn)
            if score > best:
                best_scale, best = scale, score
        return {name: best, "t2i_best_guidance": best_scale}

    def _use_guidance(self, scale: float) -> None:
        """Draw with ``scale`` from now on, and save it with the model (``mmflow generate``
        draws with the saved settings)."""
        self.sampling = replace(self.sampling, guidance_scale=scale)
        sampling = {**self.save_meta.get("sampling", {}), "guidance_scale": scale}
        self.save_meta = {**self.save_meta, "sampling": sampling}

    def _clip_scored(self, guided, plain) -> dict[str, float]:
        """Mean CLIP score of the pictures drawn with guidance and without against their
        prompts, and of the real pictures the prompts describe (once: it does not change)."""
        if self.clip is None:
            return {}
        out = {"t2i_clip_score": self._clip_mean(guided),
               "t2i_clip_score_noguide": self._clip_mean(plain)}  # fmt: skip
        real = self.eval_set.prompt_pictures
        if real is not None and self._real_clip_score is None:
            self._real_clip_score = self._clip_mean(real)
        if self._real_clip_score is not None:
            out["real_clip_score"] = self._real_clip_score
        return out

    def _clip_mean(self, pictures) -> float:
        """Mean CLIP score of ``pictures`` against the prompts (the CLIP loaded once)."""
        from mmflow.eval.clip_score import clip_scores

        if self._clip is None:
            from mmflow.models.clip import ClipSpec, load_clip, resolve

            spec = ClipSpec(**self.clip["spec"]) if self.clip.get("spec") else None
            source = resolve(spec, self.clip.get("uri"), self.clip.get("run_id"))
            device = next(self._painter.model.parameters()).device
            self._clip = load_clip(source, device=str(device))
        return float(clip_scores(self._clip, pictures, self.eval_set.prompts).mean())

    def _val_nll(self, model) -> dict[str, float]:
        """Mean text NLL of held-out captions given their pictures (image->text) and image NLL of
        held-out pictures given their captions (text->image), no condition dropout."""

        es = self.eval_set
        if not es.val_texts:
            return {}
        dev = next(model.parameters()).device
        sums = {"text_nll": 0.0, "image_nll": 0.0}
        n = 0
        for i in range(0, len(es.val_texts), 256):
            texts, images = es.val_texts[i : i + 256], es.val_images[i : i + 256]
            for share, key in ((0.0, "image_nll"), (1.0, "text_nll")):
                seq = self.vocab.batch(texts, images, i2t_share=share)
                inputs, targets = (t.to(dev) for t in seq.inputs_targets())
                _, losses = model(inputs, targets)
                sums[key] += float(losses[key]) * len(texts)
            n += len(texts)
        return {f"val_{k}": v / n for k, v in sums.items()}

    def _painter_for(self, model):
        from mmflow.data.text_tokenizer import TextTokenizer
        from mmflow.generate.joint import Painter
        from mmflow.io.cache import materialize
        from mmflow.models.vqgan import load_vqgan

        dev = next(model.parameters()).device
        if self._painter is None:
            from tokenizers import Tokenizer

            vqgan, _, _ = load_vqgan(materialize(self.vqgan_uri), dev)
            tok = TextTokenizer(Tokenizer.from_str(self.tokenizer_json), "stage")
            self._painter = Painter(model, self.vocab, tok, vqgan)
        self._painter.model = model  # ZeRO-3 hands a fresh gathered copy each time
        return self._painter

    def _judged(self, pictures, suffix: str) -> dict[str, float]:
        if self.eval_set.judge_state is None:
            return {}
        from mmflow.eval.joint import t2i_scores

        if self._judge is None:
            import io

            from mmflow.eval.judge import AttributeJudge

            self._judge = AttributeJudge.load(io.BytesIO(self.eval_set.judge_state))
        predicted = self._judge.predict(pictures)
        return {
            f"{k}{suffix}": v for k, v in t2i_scores(predicted, self.eval_set.prompt_truth).items()
        }

    def _log_grid(self, pictures, prompts: list[str]) -> None:
        """Drawn pictures under their prompts, into the stage's run (rank 0 only)."""
        if not self.run_id or len(pictures) == 0:
            return
        from PIL import Image

        from mmflow.data.images import contact_sheet
        from mmflow.tracking import log_image

        images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pictures]
        try:
            sheet = contact_sheet(images, prompts, cols=8, cell=64, caption_lines=3)
            name = f"generated/step_{self._step:06d}"
            log_image(self.tracking_uri, self.run_id, sheet, name)
        except Exception as e:  # a flaky tracking server must not kill a long run
            sys.stdout.write(f"[joint_train] warning: could not log the generated grid: {e}\n")
