"""Image metrics and grids for comparing few-step samplers with their teacher.

Images are float arrays (N, H, W, C) in [-1, 1]. PSNR and MSE measure
agreement with a reference made from the same noise; SSIM is the standard
Gaussian-window SSIM (sigma 1.5, window 11, K1 0.01, K2 0.03) on the [0, 1]
range, averaged over channels; the Frechet distance compares Gaussian fits of
two feature sets.
"""

import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import linalg
from scipy.ndimage import gaussian_filter


def mse(images, reference):
    return float(np.mean(np.square(np.asarray(images, np.float64) - np.asarray(reference, np.float64))))


def psnr(images, reference, data_range=2.0):
    """Mean over images of 10 log10(range^2 / MSE), in dB; images identical to the reference count as 100 dB."""
    err = np.mean(np.square(np.asarray(images, np.float64) - np.asarray(reference, np.float64)), axis=(1, 2, 3))
    return float(np.mean(np.where(err > 0, 10 * np.log10(data_range ** 2 / np.maximum(err, 1e-20)), 100.0)))


def ssim(images, reference):
    """Mean SSIM over images and channels (Wang et al. 2004, Gaussian window)."""
    x = (np.asarray(images, np.float64) + 1) / 2
    y = (np.asarray(reference, np.float64) + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    blur = lambda a: gaussian_filter(a, sigma=(0, 1.5, 1.5, 0), truncate=3.5, mode="reflect")
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(np.mean(s))


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (rows are samples)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples give singular covariances; sqrtm's estimate is still usable
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * np.real(root)))


def equivalent_base_nfe(base_nfes, base_psnrs, psnr_value):
    """The base's evaluations that reach `psnr_value`: (nfe, extrapolated).

    Interpolates log(NFE) linearly in PSNR between the base rows (e.g. its uniform K-step runs against
    the same reference) that bracket the value. Beyond the rows it extends the nearest segment and
    says so (`extrapolated=True`): a value above every base row means "more than the largest base
    run", and the figure is an estimate. Rows whose PSNR does not rise with NFE are dropped, so that
    the curve is increasing.
    """
    order = np.argsort(np.asarray(base_nfes, np.float64))
    nfes = np.asarray(base_nfes, np.float64)[order]
    psnrs = np.asarray(base_psnrs, np.float64)[order]
    keep = [0]
    for i in range(1, len(nfes)):
        if psnrs[i] > psnrs[keep[-1]]:
            keep.append(i)
    if len(keep) < 2:
        raise ValueError("equivalent_base_nfe needs at least two base rows whose PSNR rises with NFE")
    x, y = psnrs[keep], np.log(nfes[keep])
    if x[0] <= psnr_value <= x[-1]:
        return float(np.exp(np.interp(psnr_value, x, y))), False
    i = 0 if psnr_value < x[0] else len(x) - 2
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    return float(np.exp(y[i] + slope * (psnr_value - x[i]))), True


def speedup(base_nfes, base_psnrs, psnr_value, nfe):
    """(equivalent base NFE, its ratio to `nfe`, extrapolated?): how many times fewer evaluations a
    sampler needs than the base for the same agreement with the reference."""
    equivalent, extrapolated = equivalent_base_nfe(base_nfes, base_psnrs, psnr_value)
    return equivalent, equivalent / nfe, extrapolated


def to_uint8(images):
    return np.clip((np.asarray(images) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def grid(rows, row_labels, column_labels, scale=4, pad=2):
    """A labelled PNG-ready image: rows[i][j] is an image (H, W, C) in [-1, 1]."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_w = lambda s: measure.textbbox((0, 0), s, font=font)[2]
    h, w = rows[0][0].shape[:2]
    cell_w, cell_h = w * scale + pad, h * scale + pad
    label_w = max(text_w(s) for s in row_labels) + 2 * pad
    header_h = 14 * max(1, max(len(s.split("\n")) for s in column_labels)) + pad
    canvas = Image.new("RGB", (label_w + cell_w * len(rows[0]), header_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        draw.multiline_text((label_w + j * cell_w, 0), label, fill="black", font=font, spacing=2)
    for i, (label, images) in enumerate(zip(row_labels, rows)):
        y = header_h + i * cell_h
        draw.text((pad, y + cell_h // 2 - 6), label, fill="black", font=font)
        for j, image in enumerate(images):
            pixels = to_uint8(image)
            pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels
            tile = Image.fromarray(pixels).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + j * cell_w, y))
    return canvas
