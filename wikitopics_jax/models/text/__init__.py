"""Text towers and image+text fusion heads for the multimodal topic classifier (docs/multimodal.md).

  bag.py     fastText-style bag of hashed word and character n-grams, trained from scratch.
  minilm.py  sentence-transformers' all-MiniLM-L6-v2 (pretrained BERT, mean-pooled, L2-normalised).
  fusion.py  LateFusion (concatenated or gated features), ModalityDropout, LabelQueryHead.

Tokenisation runs on the host in NumPy and yields fixed-shape int32 ids plus a mask, so the device
programs see static shapes; a row whose mask is all False is an example without text.
"""
