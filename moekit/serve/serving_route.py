"""``POST /v1/moekit/route``: the experts each token of a text goes to, for pages and scripts.

Legend: L MoE layers, K experts per token, E experts per layer, T prompt tokens.

The prompt is prefilled by the served engine (through the engine client, like any request) with
``SamplingParams(routing=True, max_new_tokens=0)``: the assignments returned are the ones that serve,
as :mod:`moekit.eval.routing` reads them. The answer, per token: its id, the text it adds (special
tokens by name, so a BOS shows) and per MoE layer its K expert ids and gate weights; and per layer
the tokens each expert got (the load bars and heatmap of the page).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from moekit.infer import SamplingParams
from moekit.infer.engine import EngineError, EngineFull
from moekit.serve.engine_client import Failure, Unavailable
from moekit.serve.protocol import APIError, RouteRequest
from moekit.serve.serving import OpenAIServing, _watch_disconnect


class RouteServing:
    """Serves the route endpoint with the completions' helpers (tokenizing, text pieces, the engine client)."""

    object_name = "moekit.route"

    def __init__(self, text: OpenAIServing):
        self.text, self.engine, self.model_name = text, text.engine, text.model_name

    def moe_layers(self) -> list[int]:
        cfg = self.engine.model.cfg
        return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]

    async def create(self, body: RouteRequest, request: Request) -> dict[str, Any]:
        if body.model is not None:
            self.text.check_model(body.model)
        layers = self.moe_layers()
        cfg = self.engine.model.cfg
        if not cfg.num_experts or not layers:
            raise APIError(400, f"model {self.model_name!r} is dense (no MoE layers): it has no routing to show",
                           param="model", code="dense_model")
        if isinstance(body.prompt, str):
            (ids,) = await self.text.tokenize([body.prompt])
        else:
            ids = list(body.prompt)
            bad = next((t for t in ids if t >= self.engine.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt holds {bad}, not a token id in [0, {self.engine.vocab_size})",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "prompt is empty (and this model adds no BOS token): send some text", param="prompt")
        if len(ids) > self.engine.max_len:  # the engine would cut it from the left; say so instead
            raise APIError(400, f"This model's maximum context length is {self.engine.max_len} tokens. However, your "
                           f"prompt has {len(ids)} tokens. Please shorten it.", param="prompt",
                           code="context_length_exceeded")
        try:
            self.engine.task_id(body.task)
        except EngineError as e:
            raise APIError(400, str(e), param="task", code="invalid_value") from None
        params = SamplingParams(max_new_tokens=0, temperature=0.0, routing=True, task=body.task)
        routing = await self._run(request, ids, params)
        if len(routing) != len(ids):  # the engine records one entry per fed token: anything else is a fault
            raise RuntimeError(f"routing for {len(routing)} tokens, the prompt has {len(ids)}")
        pieces = self.text.text_pieces(ids) if self.text.tokenizer is not None else ["" for _ in ids]
        special = set(self.engine.special.eos_ids) | {self.engine.special.bos_id}
        load = [[0] * cfg.num_experts for _ in layers]  # [L][E] tokens per expert
        tokens = []
        for t, (tid, piece, per_layer) in enumerate(zip(ids, pieces, routing)):
            for li, (experts, _) in enumerate(per_layer):
                for e in experts:
                    load[li][e] += 1
            text = self.text.token_text(tid) if tid in special and not piece else piece
            tokens.append({"index": t, "id": tid, "text": text,
                           "experts": [list(e) for e, _ in per_layer], "gates": [list(g) for _, g in per_layer]})
        return {"object": self.object_name, "model": self.model_name, "task": body.task, "layers": layers,
                "num_experts": cfg.num_experts, "top_k": cfg.top_k, "tokens": tokens, "load": load}

    async def _run(self, request: Request, ids: list[int], params: SamplingParams):
        """Prefill ``ids`` through the engine thread; every fed token's routing, in order."""
        client = self.text._client()
        if client is None:
            raise APIError(503, "the server is shutting down", "server_error", code="unavailable")
        group = client.group(stream=False)
        try:
            rid = (await client.submit(group, ids, params)).request_id
        except Unavailable as e:
            raise APIError(503, str(e), "server_error", code="unavailable") from None
        except EngineFull as e:
            raise APIError(429, f"{e}; retry later", "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.text.retry_after_s)}) from None
        except EngineError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        routing: list = []
        async with _watch_disconnect(request, lambda: client.cancel(rid)):
            while True:
                for item in await group.items.get():
                    if isinstance(item, Failure):
                        raise APIError(item.status, item.message, item.type,
                                       code="unavailable" if item.status == 503 else None)
                    routing += item.routing or []
                    if item.finished:
                        if item.finish_reason == "cancelled":
                            raise APIError(499, "client closed the request", code="client_closed")
                        return routing
