"""The reference Megrez-3B-Omni image and audio paths in torch, for the Omni tests.

transformers' Idefics2VisionTransformer for the tower; a resampler written here from the public description
(learned queries of the LLM width; kv_proj, ln_kv, keys + 2-D sin-cos positions, ln_q on the queries, one
nn.MultiheadAttention of hidden/128 heads, ln_post, then x @ proj); the audio encoder written here from
Whisper's public description (torch Conv1d k3 p1 and k3 p1 s2 with exact GELU, + the stored positions,
pre-norm blocks with bias-free keys, AvgPool1d(2), ln_post, proj, begin/end rows around the clip) over
transformers' WhisperFeatureExtractor features; LlamaForCausalLM over inputs_embeds with the media rows
written in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file


def sincos_reference(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Written apart from omni/images.py: per grid cell, [sin(w ω), cos(w ω), sin(h ω), cos(h ω)]."""
    quarter = dim // 4
    out = torch.empty(rows * cols, dim, dtype=torch.float64)
    omega = torch.tensor([1.0 / 10000 ** (i / quarter) for i in range(quarter)], dtype=torch.float64)
    for h in range(rows):
        for w in range(cols):
            out[h * cols + w] = torch.cat(
                [torch.sin(w * omega), torch.cos(w * omega), torch.sin(h * omega), torch.cos(h * omega)]
            )
    return out.float()


class OmniOracle:
    def __init__(self, hf_dir: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

        config = json.loads((hf_dir / "config.json").read_text())
        weights = {k: torch.from_numpy(v) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
        vision_fields = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
        self.tower = Idefics2VisionTransformer(Idefics2VisionConfig(**vision_fields)).eval()
        self.tower.load_state_dict(
            {k[len("vision.vpm.") :]: v for k, v in weights.items() if k.startswith("vision.vpm.")}
        )
        llm_fields = {
            k: v
            for k, v in config.items()
            if k not in ("vision_config", "audio_config", "architectures", "model_type")
        }
        self.llm = LlamaForCausalLM(LlamaConfig(**llm_fields)).eval()
        self.llm.load_state_dict({k[len("llm.") :]: v for k, v in weights.items() if k.startswith("llm.")})
        self.hidden = config["hidden_size"]
        self.patch = config["vision_config"]["patch_size"]
        r = "vision.resampler"
        self.query = weights[f"{r}.query"]
        self.kv_proj = weights[f"{r}.kv_proj.weight"]
        self.mha = torch.nn.MultiheadAttention(self.hidden, self.hidden // 128).eval()
        self.mha.load_state_dict(
            {
                "in_proj_weight": weights[f"{r}.attn.in_proj_weight"],
                "in_proj_bias": weights[f"{r}.attn.in_proj_bias"],
                "out_proj.weight": weights[f"{r}.attn.out_proj.weight"],
                "out_proj.bias": weights[f"{r}.attn.out_proj.bias"],
            }
        )
        self.norms = {
            n: (weights[f"{r}.{n}.weight"], weights[f"{r}.{n}.bias"]) for n in ("ln_q", "ln_kv", "ln_post")
        }
        self.proj = weights[f"{r}.proj"]

        audio = "audio.audio."
        self.audio_weights = {k[len(audio) :]: v for k, v in weights.items() if k.startswith(audio)}
        self.audio_config = config["audio_config"]

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self.norms[name]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-6)

    @torch.no_grad()
    def encode_slice(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] slice -> [query_num, hidden] float32."""
        x = (torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] - 127.5) / 127.5
        rows, cols = pixels.shape[0] // self.patch, pixels.shape[1] // self.patch
        features = self.tower(pixel_values=x).last_hidden_state[0]  # [rows*cols, vision hidden]
        kv = self._ln("ln_kv", features @ self.kv_proj.T)
        q = self._ln("ln_q", self.query)
        keys = kv + sincos_reference(rows, cols, self.hidden)
        out, _ = self.mha(q[:, None], keys[:, None], kv[:, None], need_weights=False)
        return (self._ln("ln_post", out[:, 0]) @ self.proj).numpy()

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], image_rows: dict[int, np.ndarray], max_new: int) -> list[int]:
        """Greedy ids for a prompt whose positions in `image_rows` take those embedding rows."""
        ids = torch.tensor([[0 if t < 0 else t for t in prompt_ids]])
        embeds = self.llm.get_input_embeddings()(ids)
        for pos, row in image_rows.items():
            embeds[0, pos] = torch.from_numpy(row)
        out, past = [], None
        logits_input = embeds
        for _ in range(max_new):
            result = self.llm(inputs_embeds=logits_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            logits_input = self.llm.get_input_embeddings()(torch.tensor([[token]]))
        return out

    @torch.no_grad()
    def encode_clip(self, samples: np.ndarray) -> np.ndarray:
        """16 kHz samples of at most 30 s -> [tokens, hidden] float32 (begin row, clip rows, end row)."""
        from transformers import WhisperFeatureExtractor

        cfg, w = self.audio_config, self.audio_weights
        extractor = WhisperFeatureExtractor(feature_size=cfg["n_mels"])
        mel = extractor(samples, sampling_rate=16000, return_tensors="np").input_features[0]
        encoder_frames = (len(samples) // 160 - 1) // 2 + 1  # conv1 keeps the length, conv2 halves it
        x = torch.from_numpy(mel[:, : 2 * encoder_frames])[None]
        gelu = torch.nn.functional.gelu
        x = gelu(torch.nn.functional.conv1d(x, w["conv1.weight"], w["conv1.bias"], padding=1))
        x = gelu(torch.nn.functional.conv1d(x, w["conv2.weight"], w["conv2.bias"], stride=2, padding=1))
        x = x[0].T + w["positional_embedding"][:encoder_frames]
        heads, width = cfg["n_head"], cfg["n_state"]

        def norm(name: str, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.layer_norm(v, (width,), w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)

        def linear(name: str, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(v, w[f"{name}.weight"], w.get(f"{name}.bias"))

        for i in range(cfg["n_layer"]):
            b = f"blocks.{i}"
            h = norm(f"{b}.attn_ln", x)
            q, k, v = (
                linear(f"{b}.attn.{p}", h).view(-1, heads, width // heads).transpose(0, 1)
                for p in ("query", "key", "value")
            )
            attn = torch.softmax(q @ k.transpose(1, 2) / (width // heads) ** 0.5, dim=-1) @ v
            x = x + linear(f"{b}.attn.out", attn.transpose(0, 1).reshape(-1, width))
            x = x + linear(f"{b}.mlp.2", gelu(linear(f"{b}.mlp.0", norm(f"{b}.mlp_ln", x))))
        x = torch.nn.functional.avg_pool1d(x.T[None], 2, 2)[0].T
        x = linear("proj", norm("ln_post", x))
        begin, end = w["audio_bos_eos_token.weight"]
        return torch.cat([begin[None], x, end[None]]).numpy()
