"""Real slide files of every vendor format this project can produce here, from an RGB image.

Each writer uses a real library (tifffile, Pillow's JPEG encoder, wsidicomizer, pylibCZIrw) and
the vendor's own headers, so the files are opened by the same OpenSlide code paths as the
scanners' files (or by our OME-TIFF / CZI readers). Level 0 is ``mpp`` um/px; every writer makes
a second level 4x smaller where the format has levels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from melanoma_mil.demo.pyramid import write_pyramid

# tiled JPEG/RGB at quality 90, no tifffile metadata: what the scanner formats below store
JPEG_TILES = {
    "tile": (256, 256),
    "photometric": "rgb",
    "compression": "jpeg",
    "compressionargs": {"level": 90},
    "metadata": None,
}
NDPI_TAGS = {"format": 65420, "lens": 65421, "x": 65422, "y": 65423, "z": 65424}


def shrink(img: np.ndarray, factor: int = 4) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // factor, h // factor), Image.BILINEAR))


def generic_tiff(path: Path, img: np.ndarray, mpp: float) -> Path:
    write_pyramid(path, img, mpp=mpp, n_levels=2)
    return path


def aperio_svs(path: Path, img: np.ndarray, mpp: float, mag: int = 20) -> Path:
    """Aperio SVS: JPEG/RGB tiles, its ImageDescription header; the reduced level is w//4 x h//4,
    so its downsample is not an integer when the size is not a multiple of 4 (as on scanners)."""
    h, w = img.shape[:2]
    head = "Aperio Image Library v12.0.15 \r\n"
    meta = f"|AppMag = {mag}|MPP = {mpp}"
    small = shrink(img)
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            img,
            **JPEG_TILES,
            description=f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90{meta}",
        )
        tif.write(
            small,
            **JPEG_TILES,
            description=f"{head}{w}x{h} -> {small.shape[1]}x{small.shape[0]} - {meta}",
        )
    return path


def hamamatsu_ndpi(path: Path, img: np.ndarray, mpp: float) -> Path:
    """NDPI: each level one JPEG strip with restart markers every 16 MCUs (OpenSlide's tiles),
    Hamamatsu's private tags. Cropped to a width that is a multiple of 128 px at every level."""
    img = img[: img.shape[0] // 32 * 32, : img.shape[1] // 512 * 512]

    def jpeg(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=92, subsampling=0, restart_marker_blocks=16)
        return buf.getvalue()

    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((img, shrink(img))):
            h, w = level.shape[:2]
            res = 1e4 / (mpp * 4**i)
            tags = [
                (NDPI_TAGS["format"], "I", 1, 1, True),
                (NDPI_TAGS["lens"], "f", 1, 20.0, True),
                (NDPI_TAGS["x"], "i", 1, 0, True),
                (NDPI_TAGS["y"], "i", 1, 0, True),
                (NDPI_TAGS["z"], "i", 1, 0, True),
            ]
            tif.write(
                iter([jpeg(level)]),
                shape=(h, w, 3),
                dtype=np.uint8,
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(1, 1),
                rowsperstrip=h,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                extratags=tags,
            )
    return path


def philips_tiff(path: Path, img: np.ndarray, mpp: float) -> Path:
    """Philips TIFF: software 'Philips DP', the DPUfsImport XML with each level's spacing."""
    spacing = [mpp / 1000 * 4**i for i in range(2)]  # mm
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" '
        f'Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">&quot;{s:g}&quot; '
        f"&quot;{s:g}&quot;</Attribute></DataObject>"
        for s in spacing
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" '
        'PMSVR="IDataObjectArray"><Array><DataObject ObjectType="DPScannedImage">'
        '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">'
        'WSI</Attribute><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" '
        f'PMSVR="IDoubleArray">&quot;{spacing[0]:g}&quot; &quot;{spacing[0]:g}&quot;</Attribute>'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" '
        f'Group="0x1001" Element="0x8B01" PMSVR="IDataObjectArray"><Array>{reps}</Array>'
        "</Attribute></DataObject></Array></Attribute></DataObject>"
    )
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((img, shrink(img))):
            tif.write(
                level,
                **JPEG_TILES,
                subfiletype=1 if i else 0,
                description=xml if i == 0 else None,
                software="Philips DP v1.0" if i == 0 else None,
            )
    return path


def ventana_bif(path: Path, img: np.ndarray, mpp: float, mag: int = 20) -> Path:
    """Ventana: a label page carrying the iScan XMP, levels described 'level=N mag=M'."""
    xmp = f'<iScan Magnification="{mag}" ScanRes="{mpp}" UnitNumber="1"/>'.encode()
    label = np.full((64, 128, 3), 230, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            label,
            photometric="rgb",
            description="Label_Image",
            metadata=None,
            extratags=[(700, 1, len(xmp), xmp, True)],
        )
        for i, level in enumerate((img, shrink(img))):
            tif.write(
                level,
                **JPEG_TILES,
                description=f"level={i} mag={mag // 4**i} quality=90",
            )
    return path


SCN_OFFSET = 128  # px: where Leica places the scanned image inside the slide's collection area


def leica_scn(path: Path, img: np.ndarray, mpp: float) -> Path:
    """Leica SCN: the scn XML (a collection in nm, the main image's view offset inside it, one
    dimension per level); the slide is the collection, the image at SCN_OFFSET px."""
    h, w = img.shape[:2]
    nm = round(mpp * 1000)
    off = SCN_OFFSET * nm
    small = shrink(img)
    dims = "".join(
        f'<dimension sizeX="{a.shape[1]}" sizeY="{a.shape[0]}" r="{i}" ifd="{i}"/>'
        for i, a in enumerate((img, small))
    )
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
        f'<collection name="slide" uuid="c" sizeX="{w * nm + 2 * off}" '
        f'sizeY="{h * nm + 2 * off}"><image name="main" uuid="i">'
        "<creationDate>2024-01-01T00:00:00.00Z</creationDate>"
        '<device model="Leica SCN400;Leica SCN" version="1.4"/>'
        f'<pixels sizeX="{w}" sizeY="{h}">{dims}</pixels>'
        f'<view sizeX="{w * nm}" sizeY="{h * nm}" offsetX="{off}" offsetY="{off}" spacingZ="0"/>'
        "<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.7</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings>"
        "</scanSettings></image></collection></scn>"
    )
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((img, small)):
            tif.write(
                level,
                **JPEG_TILES,
                subfiletype=1 if i else 0,
                description=xml if i == 0 else None,
                resolution=(1e4 / (mpp * 4**i),) * 2,
                resolutionunit="CENTIMETER",
            )
    return path


def ome_tiff(path: Path, img: np.ndarray, mpp: float) -> Path:
    """OME-TIFF pyramid in SubIFDs (what bfconvert, QuPath and tifffile write)."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "axes": "YXS"}
        tif.write(
            img, tile=(256, 256), photometric="rgb", compression="jpeg", subifds=1, metadata=meta
        )
        tif.write(
            shrink(img), tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=1
        )
    return path


def zeiss_czi(path: Path, img: np.ndarray, mpp: float) -> Path:
    """CZI written by Zeiss's libCZI (pylibCZIrw), zstd-compressed 24-bit colour (BGR)."""
    from pylibCZIrw import czi

    with czi.create_czi(str(path), exist_ok=True, compression_options="zstd1:ExplicitLevel=1") as w:
        w.write(data=np.ascontiguousarray(img[..., ::-1]), location=(0, 0))
        w.write_metadata(
            document_name=path.stem, channel_names={0: "TL"}, scale_x=mpp * 1e-6, scale_y=mpp * 1e-6
        )
    return path


def dicom_wsi(folder: Path, img: np.ndarray, mpp: float) -> Path:
    """A DICOM WSI series (one .dcm per level) converted by wsidicomizer from an Aperio SVS
    (through its OpenSlide source: its lossless one needs the system libturbojpeg)."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder.mkdir(parents=True)
    svs = aperio_svs(folder.parent / f".{folder.name}.svs", img, mpp)
    WsiDicomizer.convert(
        svs,
        folder,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        workers=1,
        tile_size=256,
        preferred_source=SourceIdentifier.OPENSLIDE,
    )
    svs.unlink()
    return folder


WRITERS = {
    "generic-tiff": (generic_tiff, ".tiff"),
    "aperio": (aperio_svs, ".svs"),
    "hamamatsu": (hamamatsu_ndpi, ".ndpi"),
    "philips": (philips_tiff, ".tiff"),
    "ventana": (ventana_bif, ".bif"),
    "leica": (leica_scn, ".scn"),
    "ome-tiff": (ome_tiff, ".ome.tiff"),
    "zeiss-czi": (zeiss_czi, ".czi"),
    "dicom": (dicom_wsi, ""),
}


def write_slide(fmt: str, folder: Path, img: np.ndarray, mpp: float = 0.5) -> Path:
    writer, ext = WRITERS[fmt]
    return writer(folder / f"{fmt}{ext}", img, mpp)
