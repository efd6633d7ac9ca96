"""Data wing: from WIT rows and images to ArrayRecord files, and from records to device batches.

Ingest (wit, thumbnails, image_decoding, labels_table, human_annotations, ingest) writes records and a
manifest (records, manifest); synthetic makes the embedded dataset; pipeline reads records in batches
with Grain; augment_device augments on the accelerator (augment is its NumPy reference); resampling
builds the thesis's resampled training sets; tfds_builder exposes records to TFDS users.
"""
