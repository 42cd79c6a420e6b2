"""Datasets: the on-disk layout (`layout`), the synthetic referring-segmentation generator (`synthetic`),
and readers for RefCOCO / RefCOCO+ / RefCOCOg (`refcoco`). All yield `layout.Sample(image, mask, record)`."""
