"""Zero-shot retrieval and classification from L2-normalised embeddings (NumPy).

Used by training's periodic evaluation and by `python -m dream_jax.evaluate`.
"""
import numpy as np


def recall_at_k(similarity: np.ndarray, ks=(1, 5)) -> dict:
    """similarity [Q, C] where the right candidate of query i is candidate i."""
    sim = np.asarray(similarity, np.float64)
    correct = sim[np.arange(sim.shape[0]), np.arange(sim.shape[0])][:, None]
    # Rank = how many candidates score strictly higher than the right one.
    rank = (sim > correct).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5)) -> dict:
    """Image→text and text→image recall@k among the N paired examples."""
    sim = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    out = {}
    for k, v in recall_at_k(sim, ks).items():
        out[f"i2t_R@{k}"] = v
    for k, v in recall_at_k(sim.T, ks).items():
        out[f"t2i_R@{k}"] = v
    return out


def class_embeddings(prompt_embeddings):
    """Per class: mean of its prompt embeddings, re-normalised. Input: list of [P_c, D]."""
    means = np.stack([np.asarray(e, np.float64).mean(0) for e in prompt_embeddings])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of argmax cosine over classes; examples with label < 0 are skipped."""
    labels = np.asarray(labels)
    keep = labels >= 0
    pred = (np.asarray(image_emb, np.float64) @ class_emb.T).argmax(1)
    return float((pred[keep] == labels[keep]).mean())
