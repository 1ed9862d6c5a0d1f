"""Metrics: text (BLEU, ROUGE-L, METEOR, CIDEr) and image (PSNR, SSIM, LPIPS, FID)."""
