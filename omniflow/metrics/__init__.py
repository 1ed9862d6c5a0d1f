"""Metrics: text (the COCO caption toolkit's BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; sacreBLEU) and image (PSNR, SSIM,
LPIPS, FID)."""
