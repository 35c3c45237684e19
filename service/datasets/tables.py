from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    count: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(32))
    layout: Mapped[str] = mapped_column(String(8))
    has_labels: Mapped[bool] = mapped_column(Boolean)
    num_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Class names of an image-folder dataset, in label order.
    classes: Mapped[list | None] = mapped_column(JSON, nullable=True)
    preprocess: Mapped[dict] = mapped_column(JSON, default=dict)
    # Task labels beyond class ids: a summary per kind (boxes, masks, sequences, texts, pairs) that a
    # job's fit check reads (modelpress/spec/labels.py). NULL when the dataset carries none.
    labels: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)
