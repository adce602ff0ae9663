//! The feedback vocabulary: every kind of human (or simulated) judgement Tiller learns from, as
//! one set of serde types.
//!
//! The kinds follow the literature's feedback channels:
//! - [`Comparison`]: a pairwise choice, the Bradley–Terry data of Pick-a-Pic (Kirstain et al. 2023,
//!   arXiv 2305.01569), HPDv2 (Wu et al. 2023, arXiv 2306.09341) and Diffusion-DPO (Wallace et al.
//!   2023, arXiv 2311.12908), with ties kept as Pick-a-Pic records them.
//! - [`Label`]: a binary like/dislike of one image, the unpaired signal of KTO (Ethayarajh et al.
//!   2024, arXiv 2402.01306) and Diffusion-KTO (Li et al. 2024, arXiv 2404.04465).
//! - [`Rating`]: 1–5 stars, as ImageReward's annotators rated images on a Likert scale (Xu et al.
//!   2023, arXiv 2304.05977).
//! - [`RegionMark`] and [`Reason`]: where an image is wrong and which factor is at fault, RichHF's
//!   region heatmaps and misalignment labels (Liang et al. 2024, arXiv 2312.10240) in the Shapes
//!   world's factor names ([`FactorLabel`]).
//!
//! Every record carries [`Provenance`]: who judged (an [`AnnotatorId`]), where the judgement came from
//! ([`Source`]) and when. Records reference prompts by [`PromptId`] and images by [`ImageId`], the
//! SHA-256 of the stored image bytes (content addressing: the same image is one id wherever it
//! comes from).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tiller_core::{Error, Result};
use tiller_testbed::PromptSpec;

// ---------------------------------------------------------------------------------------------
// Identifiers
// ---------------------------------------------------------------------------------------------

/// A prompt's id. [`PromptId::of`] derives it from the split and the text, so the same text in two
/// splits of a dataset stays two prompts (the split is a property of the prompt).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PromptId(pub String);

impl PromptId {
    /// `p-` and the first 32 hex digits (128 bits) of SHA-256(`split` `\n` `text`).
    pub fn of(split: Split, text: &str) -> Self {
        let digest = sha256_hex(format!("{}\n{text}", split.name()).as_bytes());
        Self(format!("p-{}", &digest[..32]))
    }
}

/// An image's id: the lowercase hex SHA-256 of its encoded bytes (PNG, JPEG or WebP).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageId(pub String);

impl ImageId {
    /// The id of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(sha256_hex(bytes))
    }

    /// Whether this is 64 lowercase hex digits (ids index the image folder, so anything else is
    /// refused before it reaches a path).
    pub fn is_well_formed(&self) -> bool {
        self.0.len() == 64
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// Who gave a judgement: a simulated annotator (`sim-3`), a dataset's user (`pickapic_v2/user/17`)
/// or a person.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AnnotatorId(pub String);

impl std::fmt::Display for PromptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for AnnotatorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prompts, images, annotators
// ---------------------------------------------------------------------------------------------

/// A data split. Held-out evaluation is per prompt, so the split belongs to the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Validation data (model selection).
    Validation,
    /// Test data.
    Test,
}

impl Split {
    /// The lowercase name used in files and the store.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// Parses a name written by [`Self::name`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "train" => Ok(Split::Train),
            "validation" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            other => Err(Error::invalid(format!(
                "unknown split {other:?}; expected one of train, validation, test"
            ))),
        }
    }
}

impl From<tiller_testbed::Split> for Split {
    fn from(split: tiller_testbed::Split) -> Self {
        match split {
            tiller_testbed::Split::Train => Split::Train,
            tiller_testbed::Split::Test => Split::Test,
        }
    }
}

/// A prompt as stored: its text, split and, for Shapes-world prompts, its meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRecord {
    /// The id, usually [`PromptId::of`] the split and text.
    pub id: PromptId,
    /// The text a model is given.
    pub text: String,
    /// The split the prompt belongs to.
    pub split: Split,
    /// The Shapes-world meaning, when the prompt has one (imported datasets' prompts do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PromptSpec>,
}

impl PromptRecord {
    /// A record with the derived id [`PromptId::of`].
    pub fn new(text: impl Into<String>, split: Split, spec: Option<PromptSpec>) -> Self {
        let text = text.into();
        Self {
            id: PromptId::of(split, &text),
            text,
            split,
            spec,
        }
    }

    /// A Shapes-world prompt.
    pub fn from_testbed(prompt: &tiller_testbed::Prompt, split: Split) -> Self {
        Self::new(prompt.text.clone(), split, Some(prompt.spec.clone()))
    }
}

/// The encoding of stored image bytes, sniffed from their magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// PNG (Tiller's own images).
    Png,
    /// JPEG (Pick-a-Pic, HPDv2).
    Jpeg,
    /// WebP (ImageRewardDB).
    Webp,
}

impl ImageFormat {
    /// The file extension used in the image folder.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The lowercase name used in the store.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// Parses a name written by [`Self::name`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "png" => Ok(ImageFormat::Png),
            "jpeg" => Ok(ImageFormat::Jpeg),
            "webp" => Ok(ImageFormat::Webp),
            other => Err(Error::invalid(format!(
                "unknown image format {other:?}; expected png, jpeg or webp"
            ))),
        }
    }
}

/// An image as stored: its content hash, format and size (the bytes live in the image folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// SHA-256 of the bytes.
    pub id: ImageId,
    /// How the bytes are encoded.
    pub format: ImageFormat,
    /// Width in pixels, read from the header.
    pub width: u32,
    /// Height in pixels, read from the header.
    pub height: u32,
}

/// An annotator as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotatorRecord {
    /// The id feedback refers to.
    pub id: AnnotatorId,
    /// Simulated, a dataset's user, or a person.
    pub source: Source,
    /// A simulated annotator's taste weights (`None` for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taste: Option<crate::annotator::TasteWeights>,
}

impl AnnotatorRecord {
    /// Checks the taste weights are finite.
    pub fn validate(&self) -> Result<()> {
        if let Some(taste) = &self.taste {
            taste
                .validate()
                .map_err(|e| Error::invalid(format!("annotator {}: {e}", self.id)))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Provenance
// ---------------------------------------------------------------------------------------------

/// Where a judgement came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A simulated annotator ([`crate::annotator`]) on the run's seed.
    Simulated {
        /// The panel's seed.
        seed: u64,
    },
    /// A public dataset, imported by a loader ([`crate::loaders`]).
    Dataset {
        /// The dataset's name, e.g. `pickapic_v2`.
        name: String,
    },
    /// A person, e.g. in the labelling UI.
    Human,
}

/// Who judged, how, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The annotator.
    pub annotator: AnnotatorId,
    /// Simulated, dataset or human.
    pub source: Source,
    /// When, in milliseconds since the Unix epoch (`None` when the source does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Feedback kinds
// ---------------------------------------------------------------------------------------------

/// The outcome of a pairwise comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// `image_a` preferred.
    A,
    /// `image_b` preferred.
    B,
    /// No preference (Pick-a-Pic's `label_0 = 0.5`).
    Tie,
}

impl Choice {
    /// The same judgement with the two images swapped.
    pub fn swapped(self) -> Self {
        match self {
            Choice::A => Choice::B,
            Choice::B => Choice::A,
            Choice::Tie => Choice::Tie,
        }
    }
}

/// A pairwise preference between two images for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    /// The prompt both images were generated for.
    pub prompt: PromptId,
    /// The first image.
    pub image_a: ImageId,
    /// The second image.
    pub image_b: ImageId,
    /// Which was preferred.
    pub choice: Choice,
    /// Who, how, when.
    pub provenance: Provenance,
}

/// A binary judgement of one image (KTO's desirable / undesirable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    /// The prompt.
    pub prompt: PromptId,
    /// The image.
    pub image: ImageId,
    /// Liked (desirable) or not.
    pub like: bool,
    /// Who, how, when.
    pub provenance: Provenance,
}

/// A star rating, 1 to 5 inclusive. Construct with [`Stars::new`]; deserialising checks the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Stars(u8);

impl Stars {
    /// `stars` if it is in 1..=5.
    pub fn new(stars: u8) -> Result<Self> {
        if (1..=5).contains(&stars) {
            Ok(Self(stars))
        } else {
            Err(Error::invalid(format!(
                "a rating has 1 to 5 stars, got {stars}"
            )))
        }
    }

    /// The number of stars.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Stars {
    type Error = Error;
    fn try_from(stars: u8) -> Result<Self> {
        Self::new(stars)
    }
}

impl From<Stars> for u8 {
    fn from(stars: Stars) -> u8 {
        stars.0
    }
}

/// An absolute rating of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rating {
    /// The prompt.
    pub prompt: PromptId,
    /// The image.
    pub image: ImageId,
    /// 1 to 5 stars.
    pub stars: Stars,
    /// The raw score on the source's own scale, when there is one (ImageRewardDB's 1–7
    /// `overall_rating`, a simulated annotator's utility). Must be finite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Who, how, when.
    pub provenance: Provenance,
}

/// What is wrong with an image, in the Shapes world's factor names. The gold evaluator scores each
/// ([`tiller_testbed::Evaluation`]); the mapping:
///
/// | label | evaluator factor |
/// |---|---|
/// | `missing_object` | `factors.presence` |
/// | `wrong_count` | `factors.count` |
/// | `wrong_color` | `factors.color` |
/// | `wrong_position` | `factors.position` |
/// | `wrong_binding` | `factors.binding` |
/// | `forbidden_mark` | `mark.unasked()` (a mark the prompt did not ask for) |
/// | `border` (off-frame) | `parsed.aesthetics.border` |
/// | `noisy_background` | `parsed.aesthetics.clean_background` |
/// | `blurry` | `parsed.aesthetics.crisp_edges` |
/// | `unbalanced` (off-centre) | `parsed.aesthetics.balance` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorLabel {
    /// An asked-for object is missing.
    MissingObject,
    /// Too many or too few objects.
    WrongCount,
    /// An object has the wrong colour.
    WrongColor,
    /// Objects are not where the prompt put them.
    WrongPosition,
    /// Colours and shapes are each present but swapped between objects.
    WrongBinding,
    /// The forbidden mark appears unasked.
    ForbiddenMark,
    /// An item touches (or nearly touches) an image edge: off-frame.
    #[serde(alias = "off_frame")]
    Border,
    /// The background is speckled.
    NoisyBackground,
    /// Edges are soft.
    Blurry,
    /// The composition is off-centre.
    #[serde(alias = "off_centre")]
    Unbalanced,
}

impl FactorLabel {
    /// Every label, in declaration order.
    pub const ALL: [FactorLabel; 10] = [
        FactorLabel::MissingObject,
        FactorLabel::WrongCount,
        FactorLabel::WrongColor,
        FactorLabel::WrongPosition,
        FactorLabel::WrongBinding,
        FactorLabel::ForbiddenMark,
        FactorLabel::Border,
        FactorLabel::NoisyBackground,
        FactorLabel::Blurry,
        FactorLabel::Unbalanced,
    ];
}

/// A per-pixel mask, packed 8 pixels a byte (row-major, least significant bit first), serialised as
/// `{"width", "height", "bits": "<hex>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RegionMaskRepr", into = "RegionMaskRepr")]
pub struct RegionMask {
    width: u32,
    height: u32,
    packed: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionMaskRepr {
    width: u32,
    height: u32,
    bits: String,
}

impl RegionMask {
    /// A mask from one bool per pixel (`bits[y * width + x]`).
    pub fn from_bools(width: u32, height: u32, bits: &[bool]) -> Result<Self> {
        let n = width as usize * height as usize;
        if bits.len() != n {
            return Err(Error::invalid(format!(
                "a {width}x{height} mask needs {n} bits, got {}",
                bits.len()
            )));
        }
        let mut packed = vec![0u8; n.div_ceil(8)];
        for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
            packed[i / 8] |= 1 << (i % 8);
        }
        Ok(Self {
            width,
            height,
            packed,
        })
    }

    /// The mask of an evaluator factor.
    pub fn from_testbed(mask: &tiller_testbed::Mask) -> Result<Self> {
        Self::from_bools(mask.width as u32, mask.height as u32, &mask.bits)
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Whether pixel (`x`, `y`) is set.
    pub fn get(&self, x: u32, y: u32) -> bool {
        let i = y as usize * self.width as usize + x as usize;
        self.packed[i / 8] >> (i % 8) & 1 == 1
    }

    /// One bool per pixel, row-major.
    pub fn to_bools(&self) -> Vec<bool> {
        let n = self.width as usize * self.height as usize;
        (0..n)
            .map(|i| self.packed[i / 8] >> (i % 8) & 1 == 1)
            .collect()
    }

    /// Number of set pixels.
    pub fn count(&self) -> usize {
        self.packed.iter().map(|b| b.count_ones() as usize).sum()
    }
}

impl TryFrom<RegionMaskRepr> for RegionMask {
    type Error = Error;
    fn try_from(repr: RegionMaskRepr) -> Result<Self> {
        let n = repr.width as usize * repr.height as usize;
        let bad = |why: &str| {
            Error::invalid(format!(
                "mask {}x{}: field `bits` {why}",
                repr.width, repr.height
            ))
        };
        if repr.bits.len() != 2 * n.div_ceil(8) {
            return Err(bad(&format!(
                "must hold {} hex digits, got {}",
                2 * n.div_ceil(8),
                repr.bits.len()
            )));
        }
        let mut packed = Vec::with_capacity(n.div_ceil(8));
        for i in (0..repr.bits.len()).step_by(2) {
            let byte = repr
                .bits
                .get(i..i + 2)
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| bad("is not hex"))?;
            packed.push(byte);
        }
        // Padding bits past the last pixel must be clear, so equal masks have equal encodings.
        if !n.is_multiple_of(8) && packed.last().is_some_and(|b| b >> (n % 8) != 0) {
            return Err(bad("sets bits past the last pixel"));
        }
        Ok(Self {
            width: repr.width,
            height: repr.height,
            packed,
        })
    }
}

impl From<RegionMask> for RegionMaskRepr {
    fn from(mask: RegionMask) -> Self {
        Self {
            width: mask.width,
            height: mask.height,
            bits: mask.packed.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Where an image is wrong, and which factor the region is evidence for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionMark {
    /// The prompt.
    pub prompt: PromptId,
    /// The image.
    pub image: ImageId,
    /// The marked pixels.
    pub mask: RegionMask,
    /// What the region shows.
    pub factor: FactorLabel,
    /// Who, how, when.
    pub provenance: Provenance,
}

/// Why an image falls short: the failing factors (empty when nothing is wrong).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// The prompt.
    pub prompt: PromptId,
    /// The image.
    pub image: ImageId,
    /// The factors at fault, each at most once.
    pub factors: Vec<FactorLabel>,
    /// Who, how, when.
    pub provenance: Provenance,
}

/// The kind of a feedback record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackKind {
    /// [`Comparison`].
    Comparison,
    /// [`Label`].
    Label,
    /// [`Rating`].
    Rating,
    /// [`RegionMark`].
    RegionMark,
    /// [`Reason`].
    Reason,
}

impl FeedbackKind {
    /// The snake-case name used in files and the store.
    pub fn name(self) -> &'static str {
        match self {
            FeedbackKind::Comparison => "comparison",
            FeedbackKind::Label => "label",
            FeedbackKind::Rating => "rating",
            FeedbackKind::RegionMark => "region_mark",
            FeedbackKind::Reason => "reason",
        }
    }
}

/// Any one feedback record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Feedback {
    /// A pairwise choice.
    Comparison(Comparison),
    /// A binary like.
    Label(Label),
    /// A star rating.
    Rating(Rating),
    /// A marked region.
    RegionMark(RegionMark),
    /// Failing factors.
    Reason(Reason),
}

impl Feedback {
    /// The kind.
    pub fn kind(&self) -> FeedbackKind {
        match self {
            Feedback::Comparison(_) => FeedbackKind::Comparison,
            Feedback::Label(_) => FeedbackKind::Label,
            Feedback::Rating(_) => FeedbackKind::Rating,
            Feedback::RegionMark(_) => FeedbackKind::RegionMark,
            Feedback::Reason(_) => FeedbackKind::Reason,
        }
    }

    /// The prompt judged.
    pub fn prompt(&self) -> &PromptId {
        match self {
            Feedback::Comparison(r) => &r.prompt,
            Feedback::Label(r) => &r.prompt,
            Feedback::Rating(r) => &r.prompt,
            Feedback::RegionMark(r) => &r.prompt,
            Feedback::Reason(r) => &r.prompt,
        }
    }

    /// The images judged (two for a comparison, one otherwise).
    pub fn images(&self) -> Vec<&ImageId> {
        match self {
            Feedback::Comparison(r) => vec![&r.image_a, &r.image_b],
            Feedback::Label(r) => vec![&r.image],
            Feedback::Rating(r) => vec![&r.image],
            Feedback::RegionMark(r) => vec![&r.image],
            Feedback::Reason(r) => vec![&r.image],
        }
    }

    /// Who, how, when.
    pub fn provenance(&self) -> &Provenance {
        match self {
            Feedback::Comparison(r) => &r.provenance,
            Feedback::Label(r) => &r.provenance,
            Feedback::Rating(r) => &r.provenance,
            Feedback::RegionMark(r) => &r.provenance,
            Feedback::Reason(r) => &r.provenance,
        }
    }

    /// A short name for error messages: kind, prompt, images and annotator.
    pub fn describe(&self) -> String {
        let images: Vec<String> = self
            .images()
            .iter()
            .map(|i| i.0.chars().take(12).collect())
            .collect();
        format!(
            "{} (prompt {}, image {}, annotator {})",
            self.kind().name(),
            self.prompt(),
            images.join(" vs "),
            self.provenance().annotator
        )
    }

    /// Checks what the types cannot: finite scores, distinct images in a pair, no repeated reason,
    /// a non-empty mask. Errors name the record.
    pub fn validate(&self) -> Result<()> {
        let fail = |why: String| Error::invalid(format!("{}: {why}", self.describe()));
        for image in self.images() {
            if !image.is_well_formed() {
                return Err(fail(format!(
                    "image id {:?} is not a 64-digit lowercase hex SHA-256",
                    image.0
                )));
            }
        }
        match self {
            Feedback::Comparison(c) if c.image_a == c.image_b => {
                return Err(fail("compares an image with itself".into()));
            }
            Feedback::Rating(r) => {
                if let Some(score) = r.score
                    && !score.is_finite()
                {
                    return Err(Error::NonFinite(format!(
                        "{}: score is {score}",
                        self.describe()
                    )));
                }
            }
            Feedback::RegionMark(m) if m.mask.width() == 0 || m.mask.height() == 0 => {
                return Err(fail("mask has no pixels".into()));
            }
            Feedback::Reason(r) => {
                let mut seen = r.factors.clone();
                seen.sort();
                seen.dedup();
                if seen.len() != r.factors.len() {
                    return Err(fail("names a factor twice".into()));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl From<Comparison> for Feedback {
    fn from(r: Comparison) -> Self {
        Feedback::Comparison(r)
    }
}
impl From<Label> for Feedback {
    fn from(r: Label) -> Self {
        Feedback::Label(r)
    }
}
impl From<Rating> for Feedback {
    fn from(r: Rating) -> Self {
        Feedback::Rating(r)
    }
}
impl From<RegionMark> for Feedback {
    fn from(r: RegionMark) -> Self {
        Feedback::RegionMark(r)
    }
}
impl From<Reason> for Feedback {
    fn from(r: Reason) -> Self {
        Feedback::Reason(r)
    }
}

/// One line of a JSONL export: a prompt, an image's metadata, an annotator or a feedback record,
/// tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A prompt.
    Prompt(PromptRecord),
    /// An image (metadata; the bytes travel in the image folder).
    Image(ImageRecord),
    /// An annotator.
    Annotator(AnnotatorRecord),
    /// A pairwise choice.
    Comparison(Comparison),
    /// A binary like.
    Label(Label),
    /// A star rating.
    Rating(Rating),
    /// A marked region.
    RegionMark(RegionMark),
    /// Failing factors.
    Reason(Reason),
}

impl From<Feedback> for Record {
    fn from(f: Feedback) -> Self {
        match f {
            Feedback::Comparison(r) => Record::Comparison(r),
            Feedback::Label(r) => Record::Label(r),
            Feedback::Rating(r) => Record::Rating(r),
            Feedback::RegionMark(r) => Record::RegionMark(r),
            Feedback::Reason(r) => Record::Reason(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_are_checked_on_construction_and_deserialisation() {
        assert_eq!(Stars::new(5).unwrap().get(), 5);
        assert!(Stars::new(0).is_err());
        assert!(Stars::new(6).is_err());
        let e = serde_json::from_str::<Stars>("7").unwrap_err().to_string();
        assert!(e.contains("1 to 5 stars, got 7"), "{e}");
    }

    #[test]
    fn masks_pack_and_round_trip() {
        // 3x3 with the diagonal set: bits 0, 4, 8 -> bytes 0b0001_0001 = 0x11, 0b1 = 0x01.
        let bits: Vec<bool> = (0..9).map(|i| i % 4 == 0).collect();
        let m = RegionMask::from_bools(3, 3, &bits).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"width":3,"height":3,"bits":"1101"}"#);
        let back: RegionMask = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bools(), bits);
        assert_eq!(back.count(), 3);
        assert!(back.get(1, 1) && !back.get(1, 0));
        // A bit past pixel 8 (0x03 sets bit 9) and a short string are refused.
        assert!(
            serde_json::from_str::<RegionMask>(r#"{"width":3,"height":3,"bits":"1103"}"#).is_err()
        );
        assert!(
            serde_json::from_str::<RegionMask>(r#"{"width":3,"height":3,"bits":"11"}"#).is_err()
        );
    }

    #[test]
    fn prompt_ids_depend_on_split_and_text() {
        let a = PromptId::of(Split::Train, "a red circle");
        assert_eq!(a, PromptId::of(Split::Train, "a red circle"));
        assert_ne!(a, PromptId::of(Split::Test, "a red circle"));
        assert_eq!(a.0.len(), 34);
        // SHA-256 of the empty string, a published test vector.
        assert_eq!(
            ImageId::of_bytes(b"").0,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn feedback_json_is_tagged_and_factor_aliases_parse() {
        let label: FactorLabel = serde_json::from_str(r#""off_centre""#).unwrap();
        assert_eq!(label, FactorLabel::Unbalanced);
        let f = Feedback::Label(Label {
            prompt: PromptId("p".into()),
            image: ImageId("a".repeat(64)),
            like: true,
            provenance: Provenance {
                annotator: AnnotatorId("h".into()),
                source: Source::Human,
                time_ms: Some(5),
            },
        });
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.starts_with(r#"{"kind":"label""#), "{json}");
        assert_eq!(serde_json::from_str::<Feedback>(&json).unwrap(), f);
        let typo = json.replace("\"like\"", "\"liked\"");
        assert!(serde_json::from_str::<Feedback>(&typo).is_err());
    }
}
