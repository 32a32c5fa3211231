import ArgumentParser
import Granary
import GranaryVerbs
import GranaryZooKeeper

@main
struct GranaryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "granary",
        abstract: "Granary: a FaRM-style distributed transactional memory engine.",
        discussion: """
            Memory lives in replicated regions reached with one-sided operations; transactions \
            use FaRM's optimistic commit protocol.
            """,
        version: GranaryVersion.string,
        subcommands: [VersionCommand.self, NodeCommand.self, BenchCommand.self, ClusterCommand.self, CrashLoadCommand.self, CheckCommand.self]
    )
}

struct VersionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "version", abstract: "Print Granary's version.")

    func run() {
        print("granary \(GranaryVersion.string)")
    }
}

/// The transports a command can run a node over.
enum TransportChoice: String, ExpressibleByArgument, CaseIterable, Sendable, Codable {
    /// Shared memory: every node on this host.
    case shm
    /// RDMA verbs (soft-RoCE or hardware).
    case verbs
}

/// A failure while a command runs (a load that fails, an invariant that does not hold, a file
/// that cannot be read): printed as `Error: ...` with exit status 1. Usage errors stay
/// `ValidationError`s, which print the usage text and exit 64.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
