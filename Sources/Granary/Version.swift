/// Granary's version.
public enum GranaryVersion {
    /// The release this build reports, in semantic-versioning form.
    public static let string = "0.1.0"
}
