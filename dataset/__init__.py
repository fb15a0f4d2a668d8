"""Scripts that turn public raw datasets into RecBole atomic files: ``python -m dataset.prepare``.

Light on purpose (pandas, numpy and tqdm only): nothing here imports RecBole or torch.
"""
