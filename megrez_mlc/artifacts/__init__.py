"""The artifact formats every pipeline step shares, MLC-LLM's own: the quantization schemes and their int4
layout, the stored tensor names, tensor-cache.json with its weight shards, and mlc-chat-config.json.

This package is the bottom floor: quantize/ writes through it; compile/, runtime/, package and verify read
through it; it imports none of them.
"""
