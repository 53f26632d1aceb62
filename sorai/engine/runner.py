"""One batched forward: flatten the scheduled sequences into a row, run the model, return logits.

Only sequences whose scheduled tokens reach their end get logits (a partial prefill chunk
needs none), so the vocabulary projection runs on as few rows as possible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from sorai.engine.images import splice_rows
from sorai.engine.paged_cache import Chunk, PagedKVCache, StepLayout
from sorai.engine.sequence import Sequence
from sorai.model.multi_lora import MultiLoRA
from sorai.model.quant.linear import kernel_rows_of
from sorai.model.transformer import Transformer


class ModelRunner:
    def __init__(
        self, model: Transformer, cache: PagedKVCache, lora: Callable[[], MultiLoRA | None]
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        self.lora = lora  # the adapter slots, once any adapter has been loaded
        # A vision-language checkpoint's image encoder (sorai/model/llava.py), or None.
        self.image_encoder = getattr(model, "image_encoder", None)

    def execute(self, scheduled: Seq[tuple[Sequence, int]]) -> tuple[list[Sequence], Tensor]:
        """Run `num_new` tokens of each sequence; returns the sequences to sample and their
        logits [S, vocab]."""
        # Decodes sorted by adapter slot: each adapter's rows are then one contiguous run.
        decodes = sorted(
            ((s, n) for s, n in scheduled if n == 1), key=lambda sn: sn[0].request.lora_slot
        )
        prefills = [(s, n) for s, n in scheduled if n > 1]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        generated: list[bool] = []  # per token: generated (not a prompt token)
        sample_seqs: list[Sequence] = []
        logit_rows: list[int] = []
        lora_slots: list[int] = []  # per token: its adapter slot, -1 for the base model
        cache = self.cache
        chunks = []
        image_pieces = []  # (first row, first position, count, spans) of requests with images
        for seq, n in (*decodes, *prefills):
            start = seq.num_computed
            spans = seq.request.image_spans
            if spans and any(sp.start < start + n and start < sp.end for sp in spans):
                image_pieces.append((len(tokens), start, n, spans))
            if n > 1:
                context_slots = None
                if start:
                    context_slots = torch.tensor(
                        cache.slots(seq.blocks, 0, start + n), device=self.device
                    )
                chunks.append(Chunk(len(tokens), n, start, context_slots))
            tokens.extend(seq.token_ids[start : start + n])
            lora_slots.extend([seq.request.lora_slot] * n)
            positions.extend(range(start, start + n))
            generated.extend(p >= seq.num_prompt for p in range(start, start + n))
            slots.extend(cache.slots(seq.blocks, start, start + n))
            if start + n == seq.num_tokens:
                sample_seqs.append(seq)
                logit_rows.append(len(tokens) - 1)

        decode_slots = decode_mask = None
        if decodes:
            bs = cache.block_size
            lengths = [s.num_computed + 1 for s, _ in decodes]
            width = max(len(s.blocks) for s, _ in decodes)
            tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, _ in decodes])
            span = torch.arange(max(lengths))
            decode_slots = (tables[:, span // bs] * bs + span % bs).to(self.device)
            if min(lengths) < max(lengths):
                # Padding to mask; with none (one sequence, or equal lengths) SDPA runs unmasked.
                column = torch.tensor(lengths)[:, None]
                decode_mask = (span[None, :] < column)[:, None, None].to(self.device)

        cache.layout = StepLayout(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            chunks=chunks,
        )
        lora = self.lora()
        # Generated tokens gather their adapters' weights, prompt tokens run per adapter
        # (sorai.model.multi_lora): a token's path never depends on the rest of the batch.
        adapters = (
            lora.rows(lora_slots, generated) if lora is not None else contextlib.nullcontext()
        )
        try:
            # Low-bit layers run generated tokens on their kernel and prompt tokens on a dense
            # GEMM, whatever the batch holds (sorai.model.quant.linear).
            with torch.inference_mode(), kernel_rows_of(generated), adapters:
                inputs = torch.tensor(tokens, device=self.device)[None]
                if image_pieces:
                    return sample_seqs, self._run_with_images(
                        inputs, positions, logit_rows, image_pieces
                    )
                logits = self.model(
                    inputs,
                    torch.tensor(positions, device=self.device),
                    cache,
                    logit_indices=torch.tensor(logit_rows, dtype=torch.long, device=self.device),
                )
        finally:
            cache.layout = None
        return sample_seqs, logits[0]

    def _run_with_images(
        self, inputs: Tensor, positions: list[int], logit_rows: list[int], pieces: list
    ) -> Tensor:
        """The forward of a step whose tokens include image tokens: their embeddings are
        replaced by the images' rows (sorai/engine/images.py), and the decoder runs on the
        embeddings (without its embedding layer, it takes hidden states)."""
        model = self.model
        embed = model.embed_tokens
        assert embed is not None and self.image_encoder is not None
        # Image tokens share one placeholder id; its embedding is overwritten below.
        embeds = embed(inputs)
        splice_rows(embeds[0], pieces, self.image_encoder)
        model.embed_tokens = None
        try:
            logits = model(
                embeds,
                torch.tensor(positions, device=self.device),
                self.cache,
                logit_indices=torch.tensor(logit_rows, dtype=torch.long, device=self.device),
            )
        finally:
            model.embed_tokens = embed
        return logits[0]
