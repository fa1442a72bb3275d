"""Evaluation: global retrieval, pair-classifier re-ranking, Recall@N and the report.

    recall.py        positives within a radius, Recall@N, the recall curve (pure numpy)
    search.py        exact nearest neighbours with faiss
    dense_store.py   memory-mapped float16 patch-token store (databases larger than RAM)
    embed.py         Ray Data batch inference: global descriptors + dense features
    rerank.py        pair-classifier re-ranking of the top K, both directions
    baseline.py      the raw-pixel baseline every report shows (16 x 16 thumbnails)
    positions.py     where an "@"-named test image is: UTM fields of the name, or mock coordinates
    testset.py       test splits: "@" names placed by positions.py, other formats via the catalog readers
    benchmarks.py    the standard test sets by name, in the folder layouts their tools write
    ground_truth.py  query / database lists and per-query positives from files (MSLS-val's 740 queries)
    report.py        report.html + recall.png a person looks at
    job.py           orchestration behind pipelines/evaluate.py
"""
