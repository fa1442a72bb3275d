"""Evaluation: global retrieval, pair-classifier re-ranking, Recall@N and the report.

    recall.py        positives within a radius, Recall@N, the recall curve (pure numpy)
    search.py        exact nearest neighbours with faiss
    dense_store.py   memory-mapped float16 patch-token store (databases larger than RAM)
    embed.py         Ray Data batch inference: global descriptors + dense features
    rerank.py        pair-classifier re-ranking of the top K, both directions
    baseline.py      the raw-pixel baseline every report shows (16 x 16 thumbnails)
    testset.py       test splits read through the catalog readers
    report.py        report.html + recall.png a person looks at
    job.py           orchestration behind pipelines/evaluate.py
"""
