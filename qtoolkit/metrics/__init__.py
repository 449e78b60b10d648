"""Sample-quality metrics: FID, KID, Inception Score, improved precision/recall, and the feature networks.

Layer: denoising (beside sampling; evaluation builds on it). May import the foundation only: metrics know no
model, graph or quantizer.
"""

from .evaluate import EmbeddedImages, embed_images, evaluate, format_table
from .features import ClassifierFeatures, FeatureExtractor, check_images
from .frechet import BootstrapInterval, GaussianStats, fid, fid_bootstrap, frechet_distance, gaussian_stats, sqrtm_psd
from .inception import InceptionFeatures, cached_weights_path
from .inception_score import InceptionScore, inception_score
from .kid import KidEstimate, kid
from .precision_recall import PrecisionRecall, precision_recall

__all__ = [
    "BootstrapInterval", "ClassifierFeatures", "EmbeddedImages", "FeatureExtractor", "GaussianStats", "InceptionFeatures",
    "InceptionScore", "KidEstimate", "PrecisionRecall", "cached_weights_path", "check_images", "embed_images", "evaluate",
    "fid", "fid_bootstrap", "format_table", "frechet_distance", "gaussian_stats", "inception_score", "kid",
    "precision_recall", "sqrtm_psd",
]
