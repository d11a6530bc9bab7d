"""The token ids T5's vocabularies reserve, which data and models share.

T5 (arXiv 1910.10683) and its vocabularies (SentencePiece `cc_all.32000`,
ByT5's bytes) fix three ids: padding 0, which is also the decoder's start
token, end of sequence 1 and unknown 2. The input pipelines
(`topk_sparse.data`) write them and the models (`topk_sparse.models`) read
them; neither imports the other.
"""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
DECODER_START_ID = PAD_ID  # T5 starts decoding from the padding id
