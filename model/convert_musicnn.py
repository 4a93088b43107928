#!/usr/bin/env python3
"""Convert musicnn's MSD_musicnn TF1 checkpoint into a TorchScript embedding model.

Usage:  python3 model/convert_musicnn.py --out model/ [--wheel musicnn-0.1.0-py3-none-any.whl]

Depends only on torch (2.13.0, the libtorch version tch 0.26 loads) and numpy.
No TensorFlow, protobuf or librosa: the checkpoint is read with a small
TensorBundle reader below and the log-mel front-end is re-implemented.

The wheel `musicnn==0.1.0` (ISC licence) is taken from --wheel, or from the cache
(${XDG_CACHE_HOME:-~/.cache}/coral/wheels), where it is fetched with
`pip download --no-deps musicnn==0.1.0` when missing. Its sha256 is checked.

Output (in --out):
  musicnn-msd.pt          TorchScript module: forward(x: [B, N] f32 mono 16 kHz) -> [B, 200]
  musicnn-msd.json        manifest (see README.md)
  musicnn-msd-int8.pt     the same network with its two timbral convolutions in int8 (CPU only)
  musicnn-msd-int8.json   its manifest
  LICENSE-musicnn         the licence text shipped in the wheel
"""

import argparse
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

WHEEL_NAME = "musicnn-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "f38a4890c648c1ddbb141c5d96d2b0a8cfcd36746002d896989f7b88beb65cfa"
CKPT_DIR = "musicnn/MSD_musicnn/"
LICENSE_MEMBER = "musicnn-0.1.0.dist-info/LICENSE.md"

# musicnn/configuration.py and MSD_musicnn/config.json
SR = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
N_FRAMES = 187  # frames per patch (~3 s)
WINDOW_SAMPLES = (N_FRAMES - 1) * HOP  # 47,616: centred STFT gives exactly 187 frames
EMBEDDING_DIM = 200
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization default

MODEL_NAME = "musicnn-msd"
MODEL_VERSION = "1"
INT8_NAME = "musicnn-msd-int8"
INT8_VERSION = "1"
FUSED_NAME = "musicnn-msd-mtt"
FUSED_INT8_NAME = "musicnn-msd-mtt-int8"
FUSED_VERSION = "1"
MTT_CKPT_DIR = "musicnn/MTT_musicnn/"

CALIBRATION_WINDOWS = 64
CALIBRATION_SEED = 20261204


# --------------------------------------------------------------------------
# TF1 checkpoint (TensorBundle) reader
# --------------------------------------------------------------------------

def _varint(b, p):
    result = shift = 0
    while True:
        c = b[p]
        p += 1
        result |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return result, p


def _proto_fields(b):
    """Yield (field_number, value) of a serialized protobuf message."""
    p = 0
    while p < len(b):
        tag, p = _varint(b, p)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            v, p = _varint(b, p)
        elif wire == 1:
            v, p = b[p:p + 8], p + 8
        elif wire == 2:
            n, p = _varint(b, p)
            v, p = b[p:p + n], p + n
        elif wire == 5:
            v, p = b[p:p + 4], p + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, v


def _block_entries(block):
    """Entries of one LevelDB table block (prefix-compressed keys, restart array at the end)."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    p, key = 0, b""
    while p < end:
        shared, p = _varint(block, p)
        non_shared, p = _varint(block, p)
        value_len, p = _varint(block, p)
        key = key[:shared] + block[p:p + non_shared]
        p += non_shared
        yield key, block[p:p + value_len]
        p += value_len


def _read_table(data):
    """All key/value pairs of a LevelDB-format SSTable (uncompressed blocks)."""
    footer = data[-48:]
    if struct.unpack("<Q", footer[-8:])[0] != 0xDB4775248B80FB57:
        raise ValueError("not a LevelDB table (bad magic)")
    p = 0
    _, p = _varint(footer, p)  # metaindex offset
    _, p = _varint(footer, p)  # metaindex size
    index_off, p = _varint(footer, p)
    index_size, p = _varint(footer, p)
    table = {}
    for _, handle in _block_entries(data[index_off:index_off + index_size]):
        off, q = _varint(handle, 0)
        size, q = _varint(handle, q)
        if data[off + size] != 0:  # block trailer: compression type, crc
            raise ValueError("compressed table blocks are not supported")
        for k, v in _block_entries(data[off:off + size]):
            table[k.decode()] = v
    return table


_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def _crc32c(data):
    crc = 0xFFFFFFFF
    t = _CRC32C_TABLE
    for byte in data:
        crc = t[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_unmask(masked):
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


class Checkpoint:
    """Reads float32 tensors of a TF1 checkpoint given its .index and .data bytes."""

    DT_FLOAT = 1

    def __init__(self, index_bytes, data_shards):
        self.data = data_shards
        self.entries = {}
        for key, value in _read_table(index_bytes).items():
            if key == "":  # BundleHeaderProto
                continue
            entry = {"dtype": 0, "shape": [], "shard": 0, "offset": 0, "size": 0, "crc": None}
            for f, v in _proto_fields(value):
                if f == 1:
                    entry["dtype"] = v
                elif f == 2:  # TensorShapeProto { repeated Dim dim = 2 { int64 size = 1 } }
                    for f2, dim in _proto_fields(v):
                        if f2 == 2:
                            entry["shape"].append(dict(_proto_fields(dim)).get(1, 0))
                elif f == 3:
                    entry["shard"] = v
                elif f == 4:
                    entry["offset"] = v
                elif f == 5:
                    entry["size"] = v
                elif f == 6:
                    entry["crc"] = struct.unpack("<I", v)[0]
                elif f == 7:
                    raise ValueError(f"{key}: sliced tensors are not supported")
            self.entries[key] = entry

    def get(self, name):
        e = self.entries[name]
        if e["dtype"] != self.DT_FLOAT:
            raise ValueError(f"{name}: dtype {e['dtype']} is not float32")
        raw = self.data[e["shard"]][e["offset"]:e["offset"] + e["size"]]
        if len(raw) != e["size"]:
            raise ValueError(f"{name}: truncated data")
        if e["crc"] is not None and _crc32c_unmask(e["crc"]) != _crc32c(raw):
            raise ValueError(f"{name}: crc32c mismatch")
        return np.frombuffer(raw, dtype="<f4").reshape(e["shape"]).copy()


# --------------------------------------------------------------------------
# librosa's default (Slaney) mel filterbank, re-implemented
# --------------------------------------------------------------------------

def _hz_to_mel(f):
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m):
    m = np.asanyarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=None):
    """== librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels) (htk=False, norm='slaney')."""
    if fmax is None:
        fmax = sr / 2.0
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, len(fftfreqs)), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights.astype(np.float32)


# --------------------------------------------------------------------------
# The network (musicnn/models.py, build_musicnn with the MSD_musicnn settings)
# --------------------------------------------------------------------------

class MusicnnMSD(torch.nn.Module):
    """forward(x: [B, N] float32 mono 16 kHz) -> [B, 200].

    x is cut into floor(N / 47616) non-overlapping windows (the rest is ignored);
    each window gives one 187-frame log-mel patch; the embedding is the
    200-unit penultimate dense layer before its ReLU, averaged over windows.
    """

    window_samples: int
    n_fft: int
    hop: int
    bn_eps: float

    def __init__(self):
        super().__init__()
        self.window_samples = WINDOW_SAMPLES
        self.n_fft = N_FFT
        self.hop = HOP
        self.bn_eps = BN_EPS
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True, dtype=torch.float32))
        self.register_buffer("mel_fb", torch.from_numpy(mel_filterbank()))
        # front-end
        self.conv74 = torch.nn.Conv2d(1, 204, (7, 38))
        self.conv77 = torch.nn.Conv2d(1, 204, (7, 67))
        self.conv_t128 = torch.nn.Conv2d(1, 51, (128, 1))
        self.conv_t64 = torch.nn.Conv2d(1, 51, (64, 1))
        self.conv_t32 = torch.nn.Conv2d(1, 51, (32, 1))
        # mid-end: TF's [7, C] kernels over a [T, C, 1] map are 1-D convolutions over time
        self.mid1 = torch.nn.Conv1d(561, 64, 7)
        self.mid2 = torch.nn.Conv1d(64, 64, 7)
        self.mid3 = torch.nn.Conv1d(64, 64, 7)
        # back-end
        self.dense = torch.nn.Linear(1506, EMBEDDING_DIM)
        # batch norms (inference mode): mean, var, gamma, beta as buffers
        for name, n in [("bn_in", 1), ("bn74", 204), ("bn77", 204), ("bn_t128", 51), ("bn_t64", 51),
                        ("bn_t32", 51), ("bn_mid1", 64), ("bn_mid2", 64), ("bn_mid3", 64),
                        ("bn_pool", 1506)]:
            for stat in ("mean", "var", "gamma", "beta"):
                self.register_buffer(f"{name}_{stat}", torch.zeros(n))
        # per-channel sign of each front-end batch norm's slope (see `_pool_freq`)
        for name, n in [("sign74", 204), ("sign77", 204), ("sign_t128", 51), ("sign_t64", 51),
                        ("sign_t32", 51)]:
            self.register_buffer(name, torch.ones(n))
        self.quant = torch.ao.quantization.QuantStub()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def fold_signs(self):
        """Negate the kernels and biases of the front-end channels whose batch norm has a
        negative slope (gamma < 0) and record the sign, for `_pool_freq`'s exact rewrite."""
        for conv, bn, sign in [("conv74", "bn74", "sign74"), ("conv77", "bn77", "sign77"),
                               ("conv_t128", "bn_t128", "sign_t128"), ("conv_t64", "bn_t64", "sign_t64"),
                               ("conv_t32", "bn_t32", "sign_t32")]:
            s = torch.where(getattr(self, bn + "_gamma") < 0, -1.0, 1.0)
            mod = getattr(self, conv)
            mod.weight.data.mul_(s.view(-1, 1, 1, 1))
            mod.bias.data.mul_(s)
            getattr(self, sign).copy_(s)

    @torch.jit.export
    def logmel(self, windows: torch.Tensor) -> torch.Tensor:
        """[P, 47616] -> [P, 187, 96]: log10(1 + 10000 * mel power spectrogram)."""
        spec = torch.stft(windows, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        ri = torch.view_as_real(spec)
        power = ri[..., 0] * ri[..., 0] + ri[..., 1] * ri[..., 1]  # [P, 257, 187]
        mel = torch.matmul(self.mel_fb, power)  # [P, 96, 187]
        return torch.log10(1.0 + 10000.0 * mel).transpose(1, 2)

    def _bn(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, self.bn_eps)

    def _freq_max(self, conv: torch.Tensor) -> torch.Tensor:
        """[P, C, T, F'] -> [P, C, T]: max over frequency. A max pool over the whole frequency
        axis rather than amax, because it also runs on the int8 map (a max of quantized values
        is the quantized max, exactly), before anything is dequantized."""
        return F.max_pool2d(conv, [1, conv.size(3)])

    def _pool_freq(self, m: torch.Tensor, sign: torch.Tensor, mean: torch.Tensor,
                   var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """bn(relu(sign * m)) for m = `_freq_max(conv)`: the max over frequency of bn(relu(conv)).

        Exact: batch norm is a per-channel affine map, monotone in each channel. Where its
        slope is positive, max commutes with relu and bn. Where it is negative, the max of
        bn(relu(c)) is bn(relu(min c)); `fold_signs` negated those channels' kernels and
        biases (so the conv gives -c exactly), and min c = -max(-c). So the full-size
        [P, C, T, F'] map only goes through one max instead of relu, bn and max."""
        m = m.squeeze(3)  # [P, C, T]
        return self._bn(F.relu(m * sign.view(1, -1, 1)), mean, var, gamma, beta)

    @torch.jit.export
    def network(self, patches: torch.Tensor) -> torch.Tensor:
        """[P, 187, 96] log-mel patches -> [P, 200] pre-ReLU penultimate dense."""
        x = patches.unsqueeze(1)  # [P, 1, T, F]  (TF: [P, T, F, 1])
        x = self._bn(x, self.bn_in_mean, self.bn_in_var, self.bn_in_gamma, self.bn_in_beta)
        # timbral: pad time by 3 each side, 'valid' conv, max over frequency. The two big
        # convolutions sit between quant/dequant stubs: identities in the fp32 model, int8 in
        # the quantized one.
        xp = self.quant(F.pad(x, [0, 0, 3, 3]))
        f74 = self._pool_freq(self.dequant(self._freq_max(self.conv74(xp))), self.sign74, self.bn74_mean,
                              self.bn74_var, self.bn74_gamma, self.bn74_beta)
        f77 = self._pool_freq(self.dequant(self._freq_max(self.conv77(xp))), self.sign77, self.bn77_mean,
                              self.bn77_var, self.bn77_gamma, self.bn77_beta)
        # temporal: TF 'same' padding over time (even kernels: (k-1)//2 before, k//2 after)
        s1 = self._pool_freq(self._freq_max(self.conv_t128(F.pad(x, [0, 0, 63, 64]))), self.sign_t128,
                             self.bn_t128_mean, self.bn_t128_var, self.bn_t128_gamma, self.bn_t128_beta)
        s2 = self._pool_freq(self._freq_max(self.conv_t64(F.pad(x, [0, 0, 31, 32]))), self.sign_t64,
                             self.bn_t64_mean, self.bn_t64_var, self.bn_t64_gamma, self.bn_t64_beta)
        s3 = self._pool_freq(self._freq_max(self.conv_t32(F.pad(x, [0, 0, 15, 16]))), self.sign_t32,
                             self.bn_t32_mean, self.bn_t32_var, self.bn_t32_gamma, self.bn_t32_beta)
        front = torch.cat([f74, f77, s1, s2, s3], dim=1)  # [P, 561, T]
        # mid-end: dense (residual) 1-D convolutions over time
        m1 = self._bn(F.relu(self.mid1(F.pad(front, [3, 3]))), self.bn_mid1_mean, self.bn_mid1_var,
                      self.bn_mid1_gamma, self.bn_mid1_beta)
        m2 = self._bn(F.relu(self.mid2(F.pad(m1, [3, 3]))), self.bn_mid2_mean, self.bn_mid2_var,
                      self.bn_mid2_gamma, self.bn_mid2_beta) + m1
        m3 = self._bn(F.relu(self.mid3(F.pad(m2, [3, 3]))), self.bn_mid3_mean, self.bn_mid3_var,
                      self.bn_mid3_gamma, self.bn_mid3_beta) + m2
        mid = torch.cat([front, m1, m2, m3], dim=1)  # [P, 753, T]
        # back-end: max and mean over time, interleaved per feature as TF's flatten of [753, 2]
        pooled = torch.stack([torch.amax(mid, dim=2), torch.mean(mid, dim=2)], dim=2).reshape(-1, 1506)
        pooled = self._bn(pooled, self.bn_pool_mean, self.bn_pool_var, self.bn_pool_gamma, self.bn_pool_beta)
        return self.dense(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError("expected input [B, N] (mono float32 at 16 kHz)")
        b = x.size(0)
        n_win = x.size(1) // self.window_samples
        if n_win < 1:
            raise ValueError("input shorter than one window (47616 samples at 16 kHz); pad it")
        windows = x[:, : n_win * self.window_samples].reshape(b * n_win, self.window_samples)
        emb = self.network(self.logmel(windows.to(torch.float32)))
        return emb.reshape(b, n_win, emb.size(1)).mean(dim=1)


def centred_norm(model):
    """The network's mean distance to its mean vector over `calibration_audio` taken as 16 tracks
    of 4 windows: the fused model divides each half by it, so that both weigh the same in a
    centred cosine. (On the 137 real tracks of benches/similarity the two norms' ratio is 0.586,
    here 0.621: the weights come out within 3 % of the real-music ones.)"""
    audio = torch.from_numpy(calibration_audio().reshape(16, -1))
    with torch.inference_mode():
        e = model(audio).double()
    return float(torch.linalg.vector_norm(e - e.mean(dim=0), dim=1).mean())


class MusicnnFused(MusicnnMSD):
    """forward(x: [B, N] float32 mono 16 kHz) -> [B, 400]: musicnn's MSD and MTT networks on
    the same log-mel patches, each output multiplied by a constant (`scale`: the inverse of its
    mean distance to the mean vector on real music, so both halves weigh the same in a cosine),
    concatenated, averaged over windows like MusicnnMSD."""

    def __init__(self, msd, mtt, scales):
        torch.nn.Module.__init__(self)  # the front-end's settings and buffers, no layers of its own
        self.window_samples = msd.window_samples
        self.n_fft = msd.n_fft
        self.hop = msd.hop
        self.bn_eps = msd.bn_eps
        self.register_buffer("window", msd.window.clone())
        self.register_buffer("mel_fb", msd.mel_fb.clone())
        self.msd = msd
        self.mtt = mtt
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32))

    @torch.jit.export
    def network(self, patches: torch.Tensor) -> torch.Tensor:
        """[P, 187, 96] log-mel patches -> [P, 400]: scaled MSD then MTT embeddings."""
        return torch.cat([self.msd.network(patches) * self.scale[0],
                          self.mtt.network(patches) * self.scale[1]], dim=1)


def load_weights(model, ckpt):
    def t(name):
        return torch.from_numpy(ckpt.get(name))

    def conv2d(mod, scope):
        mod.weight.data.copy_(t(scope + "/kernel").permute(3, 2, 0, 1))  # HWIO -> OIHW
        mod.bias.data.copy_(t(scope + "/bias"))

    def conv1d(mod, scope):  # [7, C, 1, O] -> [O, C, 7]
        mod.weight.data.copy_(t(scope + "/kernel")[:, :, 0, :].permute(2, 1, 0))
        mod.bias.data.copy_(t(scope + "/bias"))

    def bn(prefix, scope):
        for stat, var in (("mean", "moving_mean"), ("var", "moving_variance"), ("gamma", "gamma"),
                          ("beta", "beta")):
            getattr(model, f"{prefix}_{stat}").copy_(t(f"{scope}/{var}"))

    # variable names follow the creation order in musicnn/models.py
    bn("bn_in", "batch_normalization")
    conv2d(model.conv74, "conv2d"); bn("bn74", "batch_normalization_1")
    conv2d(model.conv77, "conv2d_1"); bn("bn77", "batch_normalization_2")
    conv2d(model.conv_t128, "conv2d_2"); bn("bn_t128", "batch_normalization_3")
    conv2d(model.conv_t64, "conv2d_3"); bn("bn_t64", "batch_normalization_4")
    conv2d(model.conv_t32, "conv2d_4"); bn("bn_t32", "batch_normalization_5")
    conv1d(model.mid1, "conv2d_5"); bn("bn_mid1", "batch_normalization_6")
    conv1d(model.mid2, "conv2d_6"); bn("bn_mid2", "batch_normalization_7")
    conv1d(model.mid3, "conv2d_7"); bn("bn_mid3", "batch_normalization_8")
    bn("bn_pool", "batch_normalization_9")
    model.dense.weight.data.copy_(t("dense/kernel").t())
    model.dense.bias.data.copy_(t("dense/bias"))


# --------------------------------------------------------------------------
# The int8 variant: static quantization of the two big timbral convolutions
# --------------------------------------------------------------------------

def calibration_audio(count=CALIBRATION_WINDOWS, seed=CALIBRATION_SEED):
    """[count, 47616] float32 windows of generated music, the same on every machine: chords of
    harmonic tones (plucked and sustained, changing every 0.25-1 s), kick, snare and hi-hat on a
    beat of 80-170 bpm, sometimes distorted, at peaks from -30 to -0.5 dBFS. It only sets the
    activation ranges of the quantized convolutions (model/README.md measures the result on
    real music)."""
    rng = np.random.default_rng(seed)
    n = WINDOW_SAMPLES
    t = np.arange(n) / SR
    out = np.zeros((count, n), np.float64)
    for i in range(count):
        x = np.zeros(n)
        pos = 0
        while pos < n:  # chords
            length = int(rng.uniform(0.25, 1.0) * SR)
            seg = np.arange(min(length, n - pos)) / SR
            root = 55.0 * 2 ** rng.uniform(0, 4)
            pluck = rng.random() < 0.5
            env = np.exp(-seg * rng.uniform(2, 8)) if pluck else np.minimum(1, seg * 20)
            for interval in rng.choice([0, 3, 4, 7, 10, 12], size=rng.integers(2, 5), replace=False):
                f0 = root * 2 ** (interval / 12)
                for k in range(1, 9):
                    if f0 * k < SR / 2:
                        x[pos:pos + len(seg)] += env * np.sin(2 * np.pi * f0 * k * seg + rng.uniform(0, 6.3)) / k
            pos += length
        if rng.random() < 0.8:  # drums
            beat = 60.0 / rng.uniform(80, 170)
            for b in np.arange(rng.uniform(0, beat), n / SR, beat / 2):
                s = int(b * SR)
                seg = t[: min(n - s, SR // 2)]
                if round(b / beat * 2) % 4 == 0:
                    x[s:s + len(seg)] += 2.0 * np.sin(2 * np.pi * (50 + 100 * np.exp(-seg * 30)) * seg) * np.exp(-seg * 12)
                elif round(b / beat * 2) % 4 == 2:
                    x[s:s + len(seg)] += rng.normal(0, 0.8, len(seg)) * np.exp(-seg * 25)
                hat = min(len(seg), SR // 20)
                x[s:s + hat] += np.diff(rng.normal(0, 0.4, hat + 1)) * np.exp(-seg[:hat] * 80)
        if rng.random() < 0.3:
            x = np.tanh(x * rng.uniform(2, 6))
        peak = 10 ** (rng.uniform(-30, -0.5) / 20)
        out[i] = x / max(np.max(np.abs(x)), 1e-9) * peak
    return out.astype(np.float32)


def quantize_timbral(model):
    """A copy of `model` whose two timbral convolutions (3/4 of the network's multiply-adds)
    run in int8: per-channel symmetric weights, activations observed on `calibration_audio`
    (x86 backend, fbgemm kernels). Everything else stays fp32: quantizing the rest costs far
    more accuracy, and the small temporal convolutions are not faster in int8."""
    import copy
    import torch.ao.quantization as tq

    q = copy.deepcopy(model)
    q.qconfig = None
    qconfig = tq.get_default_qconfig("x86")
    for name in ("quant", "conv74", "conv77", "dequant"):
        getattr(q, name).qconfig = qconfig
    torch.backends.quantized.engine = "x86"
    tq.prepare(q, inplace=True)
    with torch.inference_mode():
        audio = torch.from_numpy(calibration_audio())
        for chunk in audio.split(16):
            q.network(q.logmel(chunk))
    tq.convert(q, inplace=True)
    return q


# --------------------------------------------------------------------------
# Wheel handling and export
# --------------------------------------------------------------------------

def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coral")


def find_wheel(path=None):
    if path is None:
        wheels = os.path.join(cache_dir(), "wheels")
        path = os.path.join(wheels, WHEEL_NAME)
        if not os.path.exists(path):
            os.makedirs(wheels, exist_ok=True)
            print(f"fetching musicnn==0.1.0 into {wheels}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", wheels, "musicnn==0.1.0"], check=True)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the expected {WHEEL_SHA256}")
    return path


def build_model(wheel_path, ckpt_dir=CKPT_DIR):
    """The network with the weights of one of the wheel's musicnn checkpoints (MSD by
    default; MTT_musicnn has the same architecture)."""
    with zipfile.ZipFile(wheel_path) as z:
        index = z.read(ckpt_dir + ".index")
        data = z.read(ckpt_dir + ".data-00000-of-00001")
        licence = z.read(LICENSE_MEMBER)
    model = MusicnnMSD()
    load_weights(model, Checkpoint(index, [data]))
    model.fold_signs()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, licence


def _fix_serialization_id(blob):
    """torch.jit.save writes a random `.data/serialization_id` (40 digits); replace its
    random half by digits derived from the rest of the archive so the bytes are reproducible."""
    name = b"archive/.data/serialization_id"
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = z.getinfo(name.decode())
        rest = hashlib.sha256()
        for other in z.infolist():
            if other.filename != info.filename:
                rest.update(other.filename.encode() + z.read(other))
        old = z.read(info)
    if info.compress_type != zipfile.ZIP_STORED or len(old) != 40 or not old.isdigit():
        return blob  # unknown layout: leave it alone
    new = old[:20] + str(int.from_bytes(rest.digest()[:8], "little")).zfill(20).encode()[:20]
    out = bytearray(blob)
    lh = info.header_offset
    nlen, xlen = struct.unpack_from("<HH", out, lh + 26)
    data_off = lh + 30 + nlen + xlen
    assert bytes(out[data_off:data_off + 40]) == old
    out[data_off:data_off + 40] = new
    crc = zipfile.crc32(new) & 0xFFFFFFFF
    struct.pack_into("<I", out, lh + 14, crc)
    cd = bytes(out).rfind(name)
    struct.pack_into("<I", out, cd - 46 + 16, crc)
    assert out[cd - 46:cd - 42] == b"PK\x01\x02"
    return bytes(out)


def _stable_source_paths():
    """TorchScript's debug info records the absolute path of every scripted source file
    (this script, torch's own modules). Record paths relative to their package instead, so
    that the bytes do not depend on where the checkout or the virtual environment lives."""
    import torch._jit_internal as jit_internal
    import torch._sources as sources

    original = sources.get_source_lines_and_file
    torch_root = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    this_file = os.path.abspath(__file__)

    def relative(obj, error_msg=None):
        lines, lineno, filename = original(obj, error_msg)
        if filename:
            path = os.path.abspath(filename)
            if path == this_file:
                filename = "model/" + os.path.basename(path)
            elif path.startswith(torch_root + os.sep):
                filename = os.path.relpath(path, torch_root)
        return lines, lineno, filename

    sources.get_source_lines_and_file = relative
    if getattr(jit_internal, "get_source_lines_and_file", None) is original:
        jit_internal.get_source_lines_and_file = relative


def _save(module, out_dir, name, version, output, source, dim=EMBEDDING_DIM, **extra):
    """Script and save `module` as <name>.pt (reproducible bytes) with its manifest."""
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is what tch loads
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    blob = _fix_serialization_id(buf.getvalue())
    pt_path = os.path.join(out_dir, name + ".pt")
    with open(pt_path, "wb") as f:
        f.write(blob)
    manifest = {
        "name": name,
        "version": version,
        "sample_rate": SR,
        "window_samples": WINDOW_SAMPLES,
        "embedding_dim": dim,
        "input": "[B, N] f32 mono in [-1,1]",
        "output": output,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "source": source,
        "torch": torch.__version__.split("+")[0],
        **extra,
    }
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return pt_path, manifest


def export(out_dir, wheel_path=None):
    """Every shipped model: musicnn-msd, musicnn-msd-int8, musicnn-msd-mtt and
    musicnn-msd-mtt-int8. Returns [(pt_path, manifest)]."""
    torch.manual_seed(0)
    wheel_path = find_wheel(wheel_path)
    model, licence = build_model(wheel_path)
    _stable_source_paths()
    os.makedirs(out_dir, exist_ok=True)
    source = "musicnn 0.1.0 (ISC), MSD_musicnn checkpoint"
    written = [_save(model, out_dir, MODEL_NAME, MODEL_VERSION,
                     "[B, 200] embedding (pre-ReLU penultimate dense, mean over 3 s patches)", source)]
    written.append(_save(quantize_timbral(model), out_dir, INT8_NAME, INT8_VERSION,
                         "[B, 200] embedding (as musicnn-msd; timbral convolutions in int8)",
                         source + f"; int8 timbral convolutions calibrated on {CALIBRATION_WINDOWS} "
                         f"generated windows (seed {CALIBRATION_SEED})",
                         cpu_only=True))
    mtt, _ = build_model(wheel_path, MTT_CKPT_DIR)
    scales = [1.0 / centred_norm(model), 1.0 / centred_norm(mtt)]
    fused_source = ("musicnn 0.1.0 (ISC), MSD_musicnn and MTT_musicnn checkpoints, each output "
                    "scaled to equal weight and concatenated")
    fused_output = "[B, 400] embedding (MSD then MTT musicnn, pre-ReLU penultimate dense, scaled; mean over 3 s patches)"
    written.append(_save(MusicnnFused(model, mtt, scales), out_dir, FUSED_NAME, FUSED_VERSION,
                         fused_output, fused_source, dim=2 * EMBEDDING_DIM))
    written.append(_save(MusicnnFused(quantize_timbral(model), quantize_timbral(mtt), scales), out_dir,
                         FUSED_INT8_NAME, FUSED_VERSION, fused_output.replace("scaled;", "scaled, timbral convolutions in int8;"),
                         fused_source + f"; int8 timbral convolutions calibrated on {CALIBRATION_WINDOWS} "
                         f"generated windows (seed {CALIBRATION_SEED})", dim=2 * EMBEDDING_DIM,
                         cpu_only=True))
    with open(os.path.join(out_dir, "LICENSE-musicnn"), "wb") as f:
        f.write(licence)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output folder (default: the folder of this script)")
    ap.add_argument("--wheel", help="path to musicnn-0.1.0-py3-none-any.whl (default: cache, fetched if missing)")
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes module constants in set order: fix string hashing for stable bytes
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]), env)
    if not torch.__version__.startswith("2.13.0"):
        print(f"warning: torch {torch.__version__}; tch 0.26 loads exports of 2.13.0", file=sys.stderr)
    t0 = time.perf_counter()
    for pt_path, manifest in export(args.out, args.wheel):
        print(f"wrote {pt_path} ({os.path.getsize(pt_path)} bytes, sha256 {manifest['sha256']})")
    print(f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
