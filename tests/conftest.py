"""Shared by the stage tests: a tiny generated world and a random policy checkpoint that uses its tokenizer."""
import torch

import data
import model as M


def tiny_world(root, n_sft=4, n_rl=3, n_eval=2, vocab_size=400):
    """Writes root/shapes (the world) and root/sft (a random tiny policy + the world's tokenizer); -> tokenizer."""
    data.generate_world(data.WorldArgs(out=str(root / "shapes"), n_sft=n_sft, n_rl=n_rl, n_eval=n_eval, n_text=20,
                                       n_captions=2, vocab_size=vocab_size))
    tok = data.load_tokenizer(str(root / "shapes" / "tokenizer"))
    torch.manual_seed(0)
    cfg = M.VLMConfig(vision=M.VisionConfig(image_size=48, patch_size=12, hidden_size=32, num_layers=2, num_heads=4,
                                            intermediate_size=64),
                      llm=M.LLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      intermediate_size=48),
                      num_frames=4, video_token_id=tok.convert_tokens_to_ids(data.VIDEO), pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    M.save_checkpoint(M.VideoLLM(cfg), tok, str(root / "sft"))
    return tok
