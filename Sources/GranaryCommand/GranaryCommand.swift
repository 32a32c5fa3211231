import ArgumentParser
import Granary

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
