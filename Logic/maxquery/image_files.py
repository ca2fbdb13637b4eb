"""What an image file's header promises, checked against the file before ITK reads a voxel.

ITK's readers trust the header: a file cut short is zero-filled, NaN and infinity in a NIfTI
become 0, a NIfTI orientation with shear is silently orthogonalised, a zero spacing becomes 1 mm,
and a negative MetaImage spacing becomes a flipped axis. Each of these gives a plausible but wrong
result, so the raw header is parsed here and the file is refused before anything is computed.
"""

from __future__ import annotations

import bz2
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_CHUNK = 1 << 24  # bytes read or decompressed at a time while checking the data
_ORTHOGONAL_TOLERANCE = 1e-3  # largest |cos| between two axes (about 0.06 degrees of shear)
_GEOMETRY_TOLERANCE_MM = 0.1  # how far ITK's reading of a corner voxel may be from the header's


@dataclass(frozen=True)
class FileHeader:
    """What a header promises: ``nbytes`` of ``dtype`` values in ``data_file``, after ``offset``
    bytes of the file and then, once decompressed (``encoding`` gzip, zlib or bzip2), ``skip``
    bytes (a ``.nii.gz`` keeps its header inside the compressed stream). ``encoding`` None: a
    layout this check cannot follow (ASCII, file lists). ``affine_lps``: a NIfTI's own
    voxel-to-LPS matrix, to compare with what ITK makes of it."""

    data_file: Path
    offset: int
    skip: int
    encoding: str | None
    nbytes: int
    dtype: np.dtype
    affine_lps: np.ndarray | None = None

    def is_complete(self) -> bool:
        """Whether the file holds every byte it promises: from its size when uncompressed, from
        the gzip trailer (the stream's length modulo 2**32) when that matches, else by reading."""
        if self.encoding is None:
            return True
        size = self.data_file.stat().st_size
        if self.encoding == "raw":
            return size - self.offset >= self.nbytes
        if self.encoding == "gzip" and size - self.offset >= 18:
            with open(self.data_file, "rb") as f:
                f.seek(-4, 2)
                if struct.unpack("<I", f.read(4))[0] == (self.skip + self.nbytes) % 2**32:
                    return True
        return _scan(self, False)[0] >= self.nbytes


def check_header(path: Path) -> FileHeader | None:
    """Parse the raw header and refuse impossible geometry (``None``: not a NIfTI/NRRD/MetaImage)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _nifti(path)
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd(path)
        if name.endswith((".mha", ".mhd")):
            return _meta_image(path)
    except (OSError, EOFError, ValueError, KeyError, IndexError, struct.error, zlib.error) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read {path} as an image (its header is damaged: {err})") from err
    return None


def check_data(path: Path, header: FileHeader) -> None:
    """Refuse a file that holds fewer bytes than its header promises, or NaN/infinite values."""
    if header.encoding is None:
        return
    if np.issubdtype(header.dtype, np.floating):
        available, bad = _scan(header, floating=True)
        if bad:
            raise InputError(f"{path} holds NaN or infinite values; a CT volume has a finite HU value in every "
                             f"voxel (replace them, e.g. by -1024 for air, and save the file again)")
    else:
        available = header.nbytes if header.is_complete() else _scan(header, floating=False)[0]
    if available < header.nbytes:
        raise InputError(
            f"{path} is incomplete: its header promises {header.nbytes} bytes of voxel data but the file holds "
            f"{available} ({100 * available / header.nbytes:.0f} %); the file was cut short (copy or download it "
            f"again)"
        )


def check_itk_geometry(path: Path, header: FileHeader, reader: sitk.ImageFileReader) -> None:
    """Refuse when ITK places the corner voxels elsewhere than the header's own voxel-to-LPS matrix."""
    if header.affine_lps is None:
        return
    size = np.asarray(reader.GetSize()[:3], float)
    corners = np.array(np.meshgrid(*[[0.0, n - 1] for n in size], indexing="ij")).reshape(3, -1)
    direction = np.asarray(reader.GetDirection(), float).reshape(reader.GetDimension(), -1)[:3, :3]
    itk = direction @ (np.asarray(reader.GetSpacing()[:3])[:, None] * corners) + np.asarray(reader.GetOrigin()[:3])[:, None]
    stated = header.affine_lps[:3, :3] @ corners + header.affine_lps[:3, 3:]
    error = float(np.max(np.linalg.norm(itk - stated, axis=0)))
    if error > _GEOMETRY_TOLERANCE_MM:
        raise InputError(
            f"{path}: the header's voxel-to-world matrix cannot be represented as spacing and orthogonal "
            f"directions (a voxel would land {error:.1f} mm from where the header puts it); resample the image "
            f"to a grid without shear and save it again"
        )


# ------------------------------------------------------------------------------------ NIfTI

_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "c8", 64: "f8", 128: "u1", 256: "i1", 512: "u2",
                768: "u4", 1024: "i8", 1280: "u8", 1792: "c16", 2304: "u1"}
_NIFTI_COMPONENTS = {128: 3, 2304: 4}


def _nifti_bytes(path: Path) -> bytes:
    """The first 540 bytes (enough for a NIfTI-2 header), decompressed for ``.nii.gz``."""
    if path.name.lower().endswith(".gz"):
        stream = zlib.decompressobj(wbits=47)
        with open(path, "rb") as f:
            data = b""
            while len(data) < 540:
                chunk = f.read(4096)
                if not chunk:
                    break
                data += stream.decompress(chunk, 540 - len(data))
                while stream.unconsumed_tail and len(data) < 540:
                    data += stream.decompress(stream.unconsumed_tail, 540 - len(data))
        return data
    with open(path, "rb") as f:
        return f.read(540)


def _nifti_fields(head: bytes) -> dict:
    if len(head) < 348:
        raise InputError(f"the file is too short to hold a NIfTI header ({len(head)} bytes)")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        raise InputError("the file does not start with a NIfTI header")
    if size == 348:
        dim = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
        pixdim = struct.unpack(endian + "8f", head[76:108])
        vox_offset, slope, _ = struct.unpack(endian + "3f", head[108:120])
        qcode, scode = struct.unpack(endian + "2h", head[252:256])
        quatern = struct.unpack(endian + "6f", head[256:280])
        srow = struct.unpack(endian + "12f", head[280:328])
    else:
        if len(head) < 540:
            raise InputError(f"the file is too short to hold a NIfTI-2 header ({len(head)} bytes)")
        datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
        dim = struct.unpack(endian + "8q", head[16:80])
        pixdim = struct.unpack(endian + "8d", head[104:168])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
        slope = struct.unpack(endian + "d", head[176:184])[0]
        qcode, scode = struct.unpack(endian + "2i", head[344:352])
        quatern = struct.unpack(endian + "6d", head[352:400])
        srow = struct.unpack(endian + "12d", head[400:496])
    if not 1 <= dim[0] <= 7 or any(n < 1 for n in dim[1:dim[0] + 1]):
        raise InputError(f"the NIfTI header gives impossible dimensions {list(dim[1:dim[0] + 1])}")
    if datatype not in _NIFTI_TYPES:
        raise InputError(f"the NIfTI data type code {datatype} is not supported")
    spatial = min(dim[0], 3)
    spacing = np.asarray(pixdim[1:spatial + 1], float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"the NIfTI header gives the voxel spacing {tuple(spacing.tolist())}; every spacing must be "
                         f"a positive number of mm (the file's geometry is broken)")
    if not np.isfinite(slope):
        raise InputError(f"the NIfTI intensity scaling (scl_slope {slope}) is not a number")
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    if scode > 0:
        affine_ras = np.vstack([np.asarray(srow, float).reshape(3, 4), [0, 0, 0, 1]])
    elif qcode > 0:
        affine_ras = _quaternion_affine(quatern, spacing, qfac)
    else:
        affine_ras = None  # ITK then uses the spacing alone, as the header says
    affine_lps = None
    if affine_ras is not None:
        affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
        _check_axes(affine_lps[:3, :spatial], "the NIfTI orientation (sform/qform)")
    components = _NIFTI_COMPONENTS.get(datatype, 1)
    dtype = np.dtype(_NIFTI_TYPES[datatype]).newbyteorder(endian)
    return {"dim": dim, "dtype": dtype, "nbytes": int(np.prod(dim[1:dim[0] + 1], dtype=np.int64)) * components
            * dtype.itemsize, "vox_offset": int(vox_offset), "affine_lps": affine_lps}


def _quaternion_affine(quatern, spacing: np.ndarray, qfac: float) -> np.ndarray:
    b, c, d, x, y, z = (float(v) for v in quatern)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    scale = np.ones(3)
    scale[: spacing.size] = spacing
    scale[2] *= qfac
    affine = np.eye(4)
    affine[:3, :3] = rotation * scale
    affine[:3, 3] = (x, y, z)
    return affine


def _nifti(path: Path) -> FileHeader:
    fields = _nifti_fields(_nifti_bytes(path))
    offset = fields["vox_offset"]
    if path.name.lower().endswith(".gz"):
        return FileHeader(path, 0, offset, "gzip", fields["nbytes"], fields["dtype"], fields["affine_lps"])
    return FileHeader(path, offset, 0, "raw", fields["nbytes"], fields["dtype"], fields["affine_lps"])


# ------------------------------------------------------------------------------------ NRRD

def _nrrd(path: Path) -> FileHeader:
    import nrrd  # pynrrd: only needed for this format
    from nrrd.reader import _determine_datatype

    with open(path, "rb") as f:
        header = nrrd.read_header(f)
        header_end = f.tell()
    sizes = [int(n) for n in header["sizes"]]
    if any(n < 1 for n in sizes):
        raise InputError(f"the NRRD header gives impossible sizes {sizes}")
    if "space directions" in header:
        vectors = np.asarray(header["space directions"], float)
        spatial = vectors[~np.all(np.isnan(vectors), axis=1)]
        if not np.all(np.isfinite(spatial)):
            raise InputError("the NRRD 'space directions' hold values that are not numbers")
        _check_axes(spatial.T, "the NRRD 'space directions'")
    if "spacings" in header:
        spacings = np.asarray(header["spacings"], float)
        spacings = spacings[np.isfinite(spacings)]
        if np.any(spacings <= 0):
            raise InputError(f"the NRRD header gives the spacings {spacings.tolist()}; every spacing must be positive")
    dtype = _determine_datatype(header)
    nbytes = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    encoding = str(header.get("encoding", "raw")).lower()
    encoding = {"gz": "gzip", "bz2": "bzip2"}.get(encoding, encoding)
    data_file, offset = path, header_end
    name = header.get("data file", header.get("datafile"))
    if name is not None:
        data_file, offset = path.parent / str(name), 0
    byte_skip = int(header.get("byte skip", 0))
    followable = (encoding in ("raw", "gzip", "bzip2") and not int(header.get("line skip", 0))
                  and data_file.is_file() and not (byte_skip == -1 and encoding != "raw"))
    if not followable:
        if name is not None and not data_file.is_file() and not str(name).startswith("LIST") and "%" not in str(name):
            raise InputError(f"{path}: its data file {data_file} does not exist")
        return FileHeader(data_file, offset, 0, None, nbytes, dtype)
    if byte_skip == -1:  # the data are the file's last bytes
        offset = max(offset, data_file.stat().st_size - nbytes)
    elif encoding == "raw":
        offset += byte_skip
    return FileHeader(data_file, offset, 0, encoding, nbytes, dtype)


# ------------------------------------------------------------------------------------ MetaImage

_META_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
               "MET_INT": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _meta_image(path: Path) -> FileHeader:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw_line in f:
            key, _, value = raw_line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
            if len(fields) > 200:
                raise InputError("no ElementDataFile line in the first 200 header lines; not a MetaImage")
        header_end = f.tell()
    if "ElementDataFile" not in fields:
        raise InputError("the MetaImage header has no ElementDataFile line")
    sizes = [int(v) for v in fields["DimSize"].split()]
    if any(n < 1 for n in sizes):
        raise InputError(f"the MetaImage header gives impossible sizes {sizes}")
    for key in ("ElementSpacing", "ElementSize"):
        if key in fields:
            spacing = [float(v) for v in fields[key].split()]
            if not all(np.isfinite(spacing)) or any(s <= 0 for s in spacing):
                raise InputError(f"the MetaImage header gives {key} {spacing}; every spacing must be a positive "
                                 f"number of mm (the file's geometry is broken)")
    key = next((k for k in ("TransformMatrix", "Rotation", "Orientation") if k in fields), None)
    if key:
        matrix = np.asarray([float(v) for v in fields[key].split()]).reshape(len(sizes), len(sizes))
        _check_axes(matrix, f"the MetaImage {key}")
    dtype = np.dtype(_META_TYPES.get(fields.get("ElementType"), "u1"))
    if any(fields.get(k, "False").lower() == "true" for k in ("BinaryDataByteOrderMSB", "ElementByteOrderMSB")):
        dtype = dtype.newbyteorder(">")
    channels = int(fields.get("ElementNumberOfChannels", 1))
    nbytes = int(np.prod(sizes, dtype=np.int64)) * channels * dtype.itemsize
    encoding = "zlib" if fields.get("CompressedData", "False").lower() == "true" else "raw"
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        return FileHeader(path, header_end, 0, encoding, nbytes, dtype)
    data_file = path.parent / name
    if name.startswith("LIST") or "%" in name or " " in name or fields.get("ElementType") not in _META_TYPES:
        return FileHeader(data_file, 0, 0, None, nbytes, dtype)
    if not data_file.is_file():
        raise InputError(f"{path}: its data file {data_file} does not exist")
    offset = int(fields.get("HeaderSize", 0))
    if offset == -1:  # the data are the file's last bytes
        offset = max(0, data_file.stat().st_size - nbytes) if encoding == "raw" else 0
    return FileHeader(data_file, offset, 0, encoding, nbytes, dtype)


# ------------------------------------------------------------------------------------ shared

def _check_axes(columns: np.ndarray, what: str) -> None:
    """Every axis vector (a column) non-zero, and the axes orthogonal (no shear)."""
    norms = np.linalg.norm(columns, axis=0)
    if np.any(~np.isfinite(norms)) or np.any(norms <= 1e-9):
        raise InputError(f"{what} give an axis of length zero; the file's geometry is broken")
    unit = columns / norms
    cosines = np.abs(unit.T @ unit - np.eye(unit.shape[1]))
    if cosines.max() > _ORTHOGONAL_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
        raise InputError(
            f"{what} are not orthogonal (axes sheared by {angle:.1f} degrees); every output would be written on "
            f"a different grid than the input's. Resample the image to an orthogonal grid and save it again"
        )


def _scan(header: FileHeader, floating: bool) -> tuple[int, bool]:
    """(bytes of data found, up to ``nbytes``; whether a NaN/inf was among them when ``floating``)."""
    found, bad, pending = 0, False, b""
    for chunk in _data_chunks(header):
        take = chunk[: header.nbytes - found]
        found += len(take)
        if floating and not bad:
            pending += take
            usable = len(pending) - len(pending) % header.dtype.itemsize
            bad = not np.isfinite(np.frombuffer(pending[:usable], header.dtype)).all()
            pending = pending[usable:]
        if found >= header.nbytes:
            break
    return found, bad


def _data_chunks(header: FileHeader):
    """The data's bytes (decompressed, at most ``_CHUNK`` at a time); stops quietly where the
    file or its compressed stream ends."""
    with open(header.data_file, "rb") as f:
        f.seek(header.offset)
        if header.encoding == "raw":
            while chunk := f.read(_CHUNK):
                yield chunk
            return
        skip = header.skip
        for data in _inflate(f, header.encoding):
            dropped = min(skip, len(data))
            skip -= dropped
            if len(data) > dropped:
                yield data[dropped:]


def _inflate(f, encoding: str):
    new = bz2.BZ2Decompressor if encoding == "bzip2" else (lambda: zlib.decompressobj(wbits=47))
    stream = new()
    try:
        while compressed := f.read(1 << 20):
            while compressed:
                if stream.eof:  # the next member of a concatenated gzip file
                    stream = new()
                yield stream.decompress(compressed, _CHUNK)
                if encoding == "bzip2":
                    while not stream.eof and not stream.needs_input:
                        yield stream.decompress(b"", _CHUNK)
                    compressed = stream.unused_data if stream.eof else b""
                else:
                    while stream.unconsumed_tail:
                        yield stream.decompress(stream.unconsumed_tail, _CHUNK)
                    compressed = stream.unused_data if stream.eof else b""
    except (zlib.error, OSError, EOFError):
        return  # damaged data: what came before is all there is
